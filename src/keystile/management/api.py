"""ManagementAPI: the owner-scoped JSON endpoints a customer manages their own keys with.

Who is asking comes only from the app's ``owner(request)`` callable: nothing the request
sends names an owner. Every key operation is scoped to that owner in the store's own
statement (``WHERE id = ? AND owner = ?``), so another owner's key is answered exactly as
a key that does not exist, 404, and its existence does not leak. A callable that returns
``None`` means nobody is signed in: 401.

What a customer may give a key is capped by a :class:`KeyPolicy`; every refusal is a 4xx
in the middleware's body shape (``error``, ``detail``) and changes nothing. Every change
is audited with the actor ``owner:<owner>``, or what the ``actor(request)`` callable says.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import (
    DuplicateKeyName,
    KeyAlreadyRotated,
    KeyLimitReached,
    KeyManagementError,
    KeyNotFound,
    RequestRefused,
    StoreError,
)
from ..hashing import DEFAULT_PARAMETERS, Argon2Parameters
from ..keys import CreatedKey
from ..manager import DEFAULT_ROTATION_GRACE, KeyManager
from ..responses import refusal_response
from ..stores.records import KeyRecord, utcnow
from ..validation import UsageGranularity, validate_owner
from . import bodies
from .document import management_document
from .policy import KeyPolicy

if TYPE_CHECKING:
    from typing_extensions import Required, Unpack

__all__ = ["ActorOf", "ManagementAPI", "ManagementOptions", "OwnerOf"]

logger = logging.getLogger("keystile")

#: The app's answer to "who is asking": an owner id, or ``None`` (nobody signed in).
OwnerOf = Callable[[Request], "Awaitable[str | None] | str | None"]
#: The audit actor of a request (``None``: ``owner:<owner>``).
ActorOf = Callable[[Request], "Awaitable[str | None] | str | None"]
Handler = Callable[[Request, str, str], Awaitable[Response]]


class ManagementOptions(TypedDict, total=False):
    """What ``management_app``, ``key_management_router`` and ``ManagementAPI.build``
    take: ``owner`` (required), ``database_url`` or ``manager``, ``policy``, ``actor``,
    ``argon2`` (for a manager made from ``database_url``), ``max_body`` (bytes)."""

    owner: Required[OwnerOf]
    database_url: str | None
    manager: KeyManager | None
    policy: KeyPolicy | None
    actor: ActorOf | None
    argon2: Argon2Parameters
    max_body: int


STATES = ("active", "disabled", "expired", "revoked")
USAGE_PERIODS = ("minute", "hour", "day")
#: The longest usage range one request reads (the default retention of usage rows).
MAX_USAGE_RANGE = timedelta(days=90)
MAX_EVENTS = 1000

_CREATE_FIELDS = {
    "name": bodies.text,
    "scopes": bodies.text_list,
    "metadata": bodies.mapping,
    "expires_in": bodies.duration,
    "expires_at": bodies.moment,
    "ip_allowlist": bodies.optional_text_list,
    "replace": bodies.flag,
}
_UPDATE_FIELDS = {name: check for name, check in _CREATE_FIELDS.items() if name not in ("replace",)}
_ROTATE_FIELDS = {"grace": bodies.duration}


async def _ask(callable_: Callable[[Request], Any], request: Request) -> Any:
    answer = callable_(request)
    return await answer if inspect.isawaitable(answer) else answer


def refusal_of(exc: KeyManagementError | StoreError) -> RequestRefused:
    """The 4xx (or 503) a manager's refusal becomes."""
    if isinstance(exc, KeyNotFound):
        return RequestRefused(404, "not_found", "No such key.")
    if isinstance(exc, DuplicateKeyName):
        return RequestRefused(409, "duplicate_name", "A live key already has this name.")
    if isinstance(exc, KeyAlreadyRotated):
        return RequestRefused(
            409, "already_rotated", f"The key was already rotated; rotate {exc.successor}."
        )
    if isinstance(exc, KeyLimitReached):
        return RequestRefused(
            403, "key_limit_reached", f"You may hold at most {exc.max_keys} live keys."
        )
    if isinstance(exc, StoreError):
        return RequestRefused(503, "temporarily_unavailable", "Retry shortly.")
    return RequestRefused(422, "invalid_field", str(exc))


def key_body(record: KeyRecord) -> dict[str, Any]:
    """A key as the API shows it: every field but the hash."""
    return record.to_public_dict()


def _created(new: CreatedKey, status: int = 201) -> Response:
    """A new key with its secret, shown this once: never stored by a cache."""
    body = {**key_body(new.record), "key": new.key}
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache", "Location": f"./{new.id}"}
    return JSONResponse(body, status_code=status, headers=headers)


class ManagementAPI:
    """The endpoints (see the module docstring); ``routes`` for a Starlette app."""

    def __init__(
        self,
        manager: KeyManager,
        *,
        owner: OwnerOf,
        policy: KeyPolicy | None = None,
        actor: ActorOf | None = None,
        max_body: int = bodies.DEFAULT_MAX_BODY,
    ) -> None:
        if not callable(owner):
            raise TypeError("owner must be a callable: owner(request) -> owner id or None")
        self.manager = manager
        self.owner = owner
        self.policy = policy or KeyPolicy()
        self.actor = actor
        self.max_body = max_body

    @classmethod
    def build(cls, **options: Unpack[ManagementOptions]) -> ManagementAPI:
        """The API on ``manager``, or on a manager of the store ``database_url`` names
        (``KEYSTILE_DATABASE_URL``, else the CLI's default, when neither is given)."""
        manager, database_url = options.get("manager"), options.get("database_url")
        if manager is not None and database_url is not None:
            raise TypeError("give database_url or manager, not both")
        if manager is None:
            argon2 = options.get("argon2", DEFAULT_PARAMETERS)
            manager = KeyManager.from_url(database_url, argon2=argon2)
        return cls(
            manager,
            owner=options["owner"],
            policy=options.get("policy"),
            actor=options.get("actor"),
            max_body=options.get("max_body", bodies.DEFAULT_MAX_BODY),
        )

    @property
    def routes(self) -> list[Route]:
        on = self._handled
        return [
            Route("/", on(self.list_keys), methods=["GET"]),
            Route("/", on(self.create_key), methods=["POST"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/{key_id}", on(self.get_key), methods=["GET"]),
            Route("/{key_id}", on(self.update_key), methods=["PATCH"]),
            Route("/{key_id}", on(self.revoke_key), methods=["DELETE"]),
            Route("/{key_id}/rotate", on(self.rotate_key), methods=["POST"]),
            Route("/{key_id}/usage", on(self.key_usage), methods=["GET"]),
            Route("/{key_id}/events", on(self.key_events), methods=["GET"]),
        ]

    def _handled(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` with the caller resolved first and every refusal answered."""

        async def endpoint(request: Request) -> Response:
            try:
                owner, actor = await self.caller(request)
                return await handler(request, owner, actor)
            except RequestRefused as exc:
                return refusal_response(exc)
            except (KeyManagementError, StoreError) as exc:
                if isinstance(exc, StoreError):
                    logger.warning("keystile: management request failed: %s", exc)
                return refusal_response(refusal_of(exc))

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    async def caller(self, request: Request) -> tuple[str, str]:
        """The owner the app says is asking, and the actor to audit; 401 for nobody."""
        owner = await _ask(self.owner, request)
        if owner is None:
            raise RequestRefused(401, "unauthorized", "Sign in to manage your keys.")
        try:
            owner = validate_owner(owner if isinstance(owner, str) else "")
        except KeyManagementError:
            logger.warning("keystile: the owner callable returned an invalid owner; refused")
            raise RequestRefused(401, "unauthorized", "Sign in to manage your keys.") from None
        actor = await _ask(self.actor, request) if self.actor is not None else None
        return owner, actor if isinstance(actor, str) and actor else f"owner:{owner}"

    # -- the endpoints -----------------------------------------------------------------

    async def list_keys(self, request: Request, owner: str, actor: str) -> Response:
        """Your keys, oldest first; ``state``, ``name_prefix`` and ``expiring_within``
        filter them."""
        state = bodies.query_value(request, "state", _state)
        prefix = bodies.query_value(request, "name_prefix", bodies.text)
        within = bodies.query_value(request, "expiring_within", bodies.duration)
        now = utcnow()
        keys = [
            record
            for record in await self.manager.list(owner)
            if (state is None or record.status(now) == state)
            and (prefix is None or record.name.startswith(prefix))
            and (within is None or _expiring(record, now, within))
        ]
        return JSONResponse({"keys": [key_body(record) for record in keys]})

    async def create_key(self, request: Request, owner: str, actor: str) -> Response:
        """Mint a key; the response carries its secret, once."""
        fields = await bodies.read_fields(request, _CREATE_FIELDS, limit=self.max_body)
        if "name" not in fields:
            raise bodies.invalid("name", "the key needs a name")
        now, policy = utcnow(), self.policy
        expires_at = _asked_expiry(fields, now)
        new = await self.manager.create(
            owner=owner,
            name=fields["name"],
            scopes=policy.scopes(fields.get("scopes", ())),
            metadata=fields.get("metadata"),
            expires_at=policy.expiry(now, expires_at),
            ip_allowlist=fields.get("ip_allowlist"),
            replace=fields.get("replace", False),
            rate_limit=policy.rate_limit,
            quota=policy.quota,
            quota_refill=policy.quota_refill,
            actor=actor,
            max_keys=policy.max_keys,
        )
        return _created(new)

    async def get_key(self, request: Request, owner: str, actor: str) -> Response:
        """One of your keys."""
        record = await self.manager.get(bodies.key_id_of(request), owner=owner)
        return JSONResponse(key_body(record))

    async def update_key(self, request: Request, owner: str, actor: str) -> Response:
        """Change a key's name, scopes, expiry, metadata or IP allowlist; not its secret."""
        key_id = bodies.key_id_of(request)
        fields = await bodies.read_fields(request, _UPDATE_FIELDS, limit=self.max_body)
        current = await self.manager.get(key_id, owner=owner)
        status = current.status()
        if status in ("revoked", "expired"):
            raise RequestRefused(409, f"key_{status}", f"The key is {status}; create a new one.")
        if "scopes" in fields:
            fields["scopes"] = self.policy.scopes(fields["scopes"])
        if "expires_at" in fields or "expires_in" in fields:
            expires_at = _asked_expiry(fields, utcnow())
            fields.pop("expires_in", None)
            fields["expires_at"] = self.policy.check_lifetime(current.created_at, expires_at)
        updated = await self.manager.update(key_id, owner=owner, actor=actor, **fields)
        return JSONResponse(key_body(updated))

    async def revoke_key(self, request: Request, owner: str, actor: str) -> Response:
        """Revoke a key, for good; revoking a revoked key changes nothing."""
        key_id = bodies.key_id_of(request)
        await self.manager.get(key_id, owner=owner)
        revoked = await self.manager.revoke(key_id, owner=owner, actor=actor)
        record = await self.manager.get(key_id, owner=owner)
        return JSONResponse({**key_body(record), "revoked_now": revoked})

    async def rotate_key(self, request: Request, owner: str, actor: str) -> Response:
        """A successor with the same name and scopes; the old key keeps working for
        ``grace`` (default one hour). The response carries the new secret, once."""
        key_id = bodies.key_id_of(request)
        fields = await bodies.read_fields(request, _ROTATE_FIELDS, limit=self.max_body)
        grace = self.policy.grace(fields.get("grace", DEFAULT_ROTATION_GRACE))
        await self.manager.get(key_id, owner=owner)
        new = await self.manager.rotate(key_id, owner=owner, grace=grace, actor=actor)
        lifetime = self.policy.max_lifetime
        record = new.record
        if lifetime is not None and (
            record.expires_at is None or record.expires_at - record.created_at > lifetime
        ):
            # A key made outside the policy (the CLI, an operator) passed its lifetime on.
            capped = record.created_at + (self.policy.default_expires_in or lifetime)
            updated = await self.manager.update(new.id, owner=owner, expires_at=capped, actor=actor)
            new = CreatedKey(new.key, updated)
        return _created(new)

    async def key_usage(self, request: Request, owner: str, actor: str) -> Response:
        """A key's requests and refused attempts per ``by`` period over ``since``."""
        key_id = bodies.key_id_of(request)
        since = bodies.query_value(request, "since", bodies.duration) or timedelta(hours=24)
        if since > MAX_USAGE_RANGE:
            raise bodies.invalid("since", "at most 90 days")
        by: UsageGranularity = bodies.query_value(request, "by", _period) or "hour"
        buckets = await self.manager.usage(key_id, owner=owner, since=since, by=by)
        return JSONResponse(
            {"key_id": key_id, "by": by, "buckets": [bucket.to_dict() for bucket in buckets]}
        )

    async def key_events(self, request: Request, owner: str, actor: str) -> Response:
        """A key's audit log, oldest first (the newest ``limit``)."""
        key_id = bodies.key_id_of(request)
        limit = bodies.query_value(request, "limit", _limit) or 100
        await self.manager.get(key_id, owner=owner)
        events = await self.manager.events(owner=owner, key_id=key_id, limit=limit)
        return JSONResponse({"events": [event.to_dict() for event in events]})

    async def openapi(self, request: Request) -> Response:
        """The OpenAPI 3.1 document of these endpoints (no owner needed to read it)."""
        prefix = request.scope.get("root_path", "")
        return JSONResponse(management_document(server=prefix or "/"))


def _asked_expiry(fields: dict[str, Any], now: datetime) -> datetime | None:
    if "expires_at" in fields and "expires_in" in fields:
        raise bodies.invalid("expires_in", "give expires_at or expires_in, not both")
    if "expires_in" in fields:
        delta: timedelta = fields["expires_in"]
        if delta <= timedelta(0):
            raise bodies.invalid("expires_in", "must be positive")
        return now + delta
    expires_at: datetime | None = fields.get("expires_at")
    if expires_at is not None and expires_at <= now:
        raise bodies.invalid("expires_at", "must be in the future")
    return expires_at


def _expiring(record: KeyRecord, now: datetime, within: timedelta) -> bool:
    expires = record.expires_at
    return expires is not None and now < expires <= now + within


def _state(field: str, value: Any) -> str:
    if value not in STATES:
        raise bodies.invalid(field, f"one of {', '.join(STATES)}")
    return str(value)


def _period(field: str, value: Any) -> str:
    if value not in USAGE_PERIODS:
        raise bodies.invalid(field, f"one of {', '.join(USAGE_PERIODS)}")
    return str(value)


def _limit(field: str, value: Any) -> int:
    if not str(value).isdigit() or not 1 <= int(value) <= MAX_EVENTS:
        raise bodies.invalid(field, f"a whole number from 1 to {MAX_EVENTS}")
    return int(value)
