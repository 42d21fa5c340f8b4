"""The authenticated principal, in Starlette's own shape (``BaseUser``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from starlette.authentication import BaseUser

from .limits import LimitPolicy
from .stores.base import KeyRecord
from .tokens import redact

__all__ = ["APIKeyUser"]


def _frozen(value: Any) -> Any:
    """``value`` with every dict made a read-only mapping and every list a tuple."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class APIKeyUser(BaseUser):
    """The key that authenticated a request: ``request.user`` after ``APIKeyMiddleware``.

    ``display_name`` is ``apikey:<name>`` for audit logs; ``identity`` is the public key
    id. It holds no secret and no hash.

    Immutable, metadata included: one instance serves every request made with the key
    while it is cached, so a handler that could change it would change what later
    requests are granted.
    """

    __slots__ = ("expires_at", "key_id", "limits", "metadata", "name", "owner", "prefix", "scopes")

    def __init__(
        self,
        *,
        key_id: str,
        owner: str,
        name: str,
        scopes: tuple[str, ...] = (),
        metadata: Mapping[str, Any] | None = None,
        prefix: str = "ks",
        expires_at: datetime | None = None,
        limits: LimitPolicy | None = None,
    ) -> None:
        init = object.__setattr__
        init(self, "key_id", key_id)
        init(self, "owner", owner)
        init(self, "name", name)
        init(self, "scopes", tuple(scopes))
        init(self, "metadata", _frozen(dict(metadata or {})))
        init(self, "prefix", prefix)
        init(self, "expires_at", expires_at)
        init(self, "limits", limits)

    key_id: str
    owner: str
    name: str
    scopes: tuple[str, ...]
    metadata: Mapping[str, Any]
    prefix: str
    expires_at: datetime | None
    #: The key's rate limit and quota, precomputed from its record (``None``: no limit of
    #: its own), so the request path pays one attribute check for an unlimited key.
    limits: LimitPolicy | None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"APIKeyUser is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"APIKeyUser is immutable: cannot delete {name!r}")

    @classmethod
    def from_record(cls, record: KeyRecord) -> APIKeyUser:
        return cls(
            key_id=record.id,
            owner=record.owner,
            name=record.name,
            scopes=record.scopes,
            metadata=record.metadata,
            prefix=record.prefix,
            expires_at=record.expires_at,
            limits=LimitPolicy.from_record(record),
        )

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return f"apikey:{self.name}"

    @property
    def identity(self) -> str:
        return self.key_id

    @property
    def redacted(self) -> str:
        return redact(self.key_id, self.prefix)

    def has_scopes(self, *scopes: str) -> bool:
        """Whether the key holds every one of ``scopes``; "authenticated" is held by every
        key, as in ``request.auth.scopes``."""
        return all(scope == "authenticated" or scope in self.scopes for scope in scopes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, APIKeyUser):
            return NotImplemented
        return (self.key_id, self.owner, self.name, self.scopes) == (
            other.key_id,
            other.owner,
            other.name,
            other.scopes,
        )

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return (
            f"APIKeyUser(key_id={self.key_id!r}, owner={self.owner!r}, name={self.name!r}, "
            f"scopes={self.scopes!r})"
        )
