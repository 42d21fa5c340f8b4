"""The request path in stages: read the credential, verify it, admit the key, record the
use, call the app.

``APIKeyMiddleware`` calls them in that order, once each. A stage returns a value or
raises one :class:`~keystile.errors.AuthenticationError`; it never calls back into the
middleware, which turns that one exception into the response (``responses.py``, or the
app's ``on_error``). The stages:

1. :func:`read_credential`: the key and where it was read from, and the headers without
   it; ``InvalidRequest`` for two different keys or an empty ``Bearer``,
   ``MissingCredentials`` for none when a key is required.
2. :func:`verify`: the cached entry of a valid key, or why it is not valid.
3. :func:`admit`: the key's IP allowlist, then its limits; the ``send`` to answer with.
   An exempt path checks the allowlist alone (:func:`check_allowlist`): it never spends.
4. Record: ``UsageRecorder.touch(key_id, now)``, a dict write; on the compiled hit path
   the cache's table counts a plain key's use itself (``usage.py``, ``attach``).
5. Call the app: the headers without the credential, a WebSocket under
   ``socket_guard``.

Why the middleware inlines the hit path instead of calling these: a request for a cached
key is served by one compiled call, ``VerifiedKeyCache.hit_request``, which does stages 1
and 2 (header walk, digest, constant-time scan, the key's freshness and expiry) and, for a
key without limits or an allowlist, stage 4 (its use counted in the table); it declines
anything unusual, which then goes through :func:`read_credential` and :func:`verify`. A
cached key without an allowlist or limits is then admitted by three attribute checks in
the middleware; a key with them is admitted by :func:`admit` and recorded by ``touch``.
Measured with ``benchmarks/instructions.py`` (callgrind, 10 cached keys): awaiting
``admit`` and calling a ``record`` function on every hit cost about 1 500 instructions per
request (keystile's share from about 16 100 to 18 400, past its 18 000 target). So the
hit path stays inline; the stages are still one each, in this order, on every path.
"""

from __future__ import annotations

import logging

from starlette.types import Scope, Send

from .cache import CachedKey
from .config import KeystileConfig
from .credentials import check_single_token, split_credential
from .errors import AuthenticationError, IPNotAllowed, MissingCredentials, ServiceUnavailable
from .limits import LimitEnforcer, send_with_headers
from .principal import APIKeyUser
from .verifier import Verifier

__all__ = ["Headers", "admit", "admit_now", "check_allowlist", "read_credential", "verify"]

logger = logging.getLogger("keystile")

Headers = list[tuple[bytes, bytes]]


def read_credential(
    headers: Headers, config: KeystileConfig
) -> tuple[bytes | None, str, Headers | None]:
    """``(token, source, headers_without_it)``; ``token`` is ``None`` only when no key was
    sent and none is required (with ``required=False`` a bearer token that is not
    keystile's counts as none, and stays in the headers)."""
    token, source, without = split_credential(headers, config.header, config.bearer_filter)
    if token is None and config.required:
        raise MissingCredentials()
    return token, source, without


async def verify(verifier: Verifier, token: bytes, source: str) -> CachedKey:
    """The cache entry of ``token``: from the cache, else verified against the store.

    The refusal carries ``source``, so the response names the header the key came from.
    An unexpected failure is logged and becomes a 503 ``internal_error``: a key that
    cannot be checked is never let through.
    """
    entry = verifier.hit(token)
    if entry is not None:
        return entry
    try:
        check_single_token(token, source)
        return await verifier.verify(token)
    except AuthenticationError as exc:
        exc.source = source
        raise
    except Exception:
        logger.exception("keystile: unexpected error while verifying a key")
        raise ServiceUnavailable("internal_error", source=source) from None


def check_allowlist(user: APIKeyUser, scope: Scope) -> None:
    """Refuse a client outside the key's IP allowlist (``scope["client"]``, what the
    server says; behind a proxy its own proxy-header handling, never ``X-Forwarded-For``
    read here). The one check an exempt path makes: it never spends a limit."""
    allowlist = user.ip_allowlist
    if allowlist is not None and not allowlist.allows(scope.get("client")):
        raise IPNotAllowed()


async def admit(
    user: APIKeyUser, scope: Scope, limits: LimitEnforcer, send: Send, cost: int = 1
) -> Send:
    """Let a verified key's request on, or raise why not: a client outside the key's IP
    allowlist (:func:`check_allowlist`), then the limits of the key and its owner, each
    with room for the request's ``cost`` (``cost=``; none spent if one refuses). Returns
    ``send``, with the ``RateLimit`` fields on the response when ``rate_limit_headers`` is
    on and the key is limited."""
    if not limits.is_async:
        return admit_now(user, scope, limits, send, cost)
    check_allowlist(user, scope)
    if user.limits is None and not limits.limits_every_key:
        return send
    refusal = await limits.acheck(user, cost)
    if refusal is not None:
        raise limits.refused(user, refusal)
    return send_with_headers(send, limits.success_headers(user)) if limits.headers else send


def admit_now(
    user: APIKeyUser, scope: Scope, limits: LimitEnforcer, send: Send, cost: int = 1
) -> Send:
    """:func:`admit` when the limits decide in this process (``memory://``): no await, so
    the middleware calls it without making a coroutine for every limited request."""
    allowlist = user.ip_allowlist  # check_allowlist, inlined: this runs on every request
    if allowlist is not None and not allowlist.allows(scope.get("client")):
        raise IPNotAllowed()
    if user.limits is None and not limits.limits_every_key:
        return send
    refusal = limits.check(user, cost)
    if refusal is not None:
        raise limits.refused(user, refusal)
    return send_with_headers(send, limits.success_headers(user)) if limits.headers else send
