"""The authenticated principal, in Starlette's own shape (``BaseUser``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from starlette.authentication import BaseUser

from .stores.base import KeyRecord
from .tokens import redact

__all__ = ["APIKeyUser"]


class APIKeyUser(BaseUser):
    """The key that authenticated a request: ``request.user`` after ``APIKeyMiddleware``.

    ``display_name`` is ``apikey:<name>`` for audit logs; ``identity`` is the public key
    id. It holds no secret and no hash.
    """

    __slots__ = ("expires_at", "key_id", "metadata", "name", "owner", "prefix", "scopes")

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
    ) -> None:
        self.key_id = key_id
        self.owner = owner
        self.name = name
        self.scopes = tuple(scopes)
        self.metadata: Mapping[str, Any] = MappingProxyType(dict(metadata or {}))
        self.prefix = prefix
        self.expires_at = expires_at

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
        return set(scopes).issubset(self.scopes)

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
