"""The values ``KeyManager`` hands out and takes: a minted key, and "leave it as it is"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .stores.records import KeyRecord
from .tokens import redact

__all__ = ["UNCHANGED", "CreatedKey", "Unchanged"]


class Unchanged:
    """The type of ``UNCHANGED``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


#: ``KeyManager.update``'s default: leave this field as it is (``None`` clears it).
UNCHANGED: Final = Unchanged()


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A freshly minted key. ``key`` is the plaintext: show it once, store it nowhere."""

    key: str = field(repr=False)
    record: KeyRecord

    @property
    def id(self) -> str:
        return self.record.id

    def __repr__(self) -> str:
        shown = redact(self.record.id, self.record.prefix)
        return f"CreatedKey(key={shown!r}, record={self.record!r})"
