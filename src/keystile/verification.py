"""Verify a key outside a request: ``await keystile.verify(token, database_url=...)``.

For what carries a key without HTTP headers: a WebSocket subprotocol, a task-queue
message, another protocol. The key is verified by the runtime a middleware with the same
options uses (:meth:`KeystileRuntime.verify`): the same verified-key cache, so argon2 runs
once per key per process whichever asked first; the same IP allowlist, limits and usage
counts; the same refusals, raised.

A middleware's runtime lives as long as the middleware. One that only ``verify`` uses is
kept here, so its cache survives between calls; :func:`aclose` stops its background work,
writes the pending ``last_used_at`` and usage counts, and closes its store (call it when a
worker shuts down).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from .config import KeystileConfig
from .principal import APIKeyUser
from .runtime import KeystileRuntime

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .config import KeystileOptions

__all__ = ["aclose", "runtime_for", "verify"]

#: The runtimes ``verify`` started, held so their caches outlive one call.
_held: dict[Hashable, KeystileRuntime] = {}


def runtime_for(config: KeystileConfig) -> KeystileRuntime:
    """The runtime of ``config`` (a running middleware's, if one has these options), kept
    until :func:`aclose`."""
    runtime = KeystileRuntime.for_config(config)
    _held[config.runtime_key] = runtime
    return runtime


async def verify(
    token: str | bytes,
    *,
    client: tuple[str, int] | None = None,
    config: KeystileConfig | None = None,
    **options: Unpack[KeystileOptions],
) -> APIKeyUser:
    """The ``APIKeyUser`` of ``token``, or the middleware's refusal raised
    (``InvalidToken``, ``IPNotAllowed``, ``RateLimited``, ``QuotaExceeded``,
    ``ServiceUnavailable``; ``keystile.responses.error_response`` turns one into the
    middleware's response).

    ``options`` are the middleware's (``database_url=``, ``cache_ttl=``, ...), or
    ``config=``; with the options of a middleware running in this process, its cache is
    shared. ``client`` (``(host, port)``) is checked against a key's IP allowlist; a key
    with one is refused without it.
    """
    if config is None:
        config = KeystileConfig.from_options(**options)
    elif options:
        config = config.replace(**options)
    return await runtime_for(config).verify(token, client=client)


async def aclose() -> None:
    """Stop the runtimes ``verify`` used: their usage is written and owned stores closed."""
    while _held:
        _, runtime = _held.popitem()
        await runtime.stop()
