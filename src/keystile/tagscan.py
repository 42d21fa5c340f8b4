"""The pure-Python tag scan: which slots hold a probe's 8-byte tag, SWAR over integers.

``PyTable`` must compare a probe with every cached tag and find the first and the last
match, doing the same work wherever the match is. Without numpy that is done with
Python's big integers as lanes (SIMD within a register):

* each slot is a 72-bit lane: the tag in bits 0-63, bit 64 set only in the padding that
  fills the last chunk (below), bits 65-71 clear. Lanes are packed little-endian into
  integers of :data:`CHUNK_LANES` lanes (slot ``i`` of a chunk is bits ``72 i …``);
* ``x = packed ^ probe * LOW`` (``LOW`` has a 1 at the bottom of every lane, so
  ``probe * LOW`` repeats the probe in every lane): a tag lane is zero where it matched;
* ``(FLAG - x) & FLAG`` (``FLAG``: bit 65 of every lane) keeps bit 65 of exactly those
  lanes. Every lane of ``x`` is below ``2 ** 65``, so each lane of ``FLAG - x`` lies in
  ``(0, 2 ** 65]``: no borrow crosses a lane, and the lane reaches ``2 ** 65`` (bit 65)
  only where ``x`` is 0. A padding lane is at least ``2 ** 64`` and never matches;
* the last match is the ``bit_length()`` of that, the first the ``bit_length()`` of its
  lowest set bit (``z & -z``): arithmetic over the whole chunk, no search that stops.

Every chunk goes through the same operations whatever it holds; a byte per chunk (1
where it matched) makes one small integer whose lowest and highest set bits name the
chunks of the first and the last match, so no loop stops at a match: the work depends
on the number of tags only. Chunks keep each integer near 4.5 KiB, where
CPython's integer operations run fastest (one 100 000-lane integer is several times
slower per lane: every intermediate is a fresh large allocation), and let a change
re-pack one chunk, not all. The chunks of a multi-chunk table all have the full width
(padding fills the last) so that one ``probe * LOW``, the costliest step, serves them
all; a table of one chunk is packed at its own width, so a small table pays for its size.
"""

from __future__ import annotations

import struct

__all__ = ["CHUNK_LANES", "PackedTags", "lane_masks", "zero_lanes"]

TAG_SIZE = 8
_LANE_SIZE = TAG_SIZE + 1
_LANE_BITS = 8 * _LANE_SIZE
#: Lanes per packed integer (512 and 1 024 measured alike; smaller is slower at 100 000).
CHUNK_LANES = 512
_FLAG_BIT = TAG_SIZE * 8 + 1
#: The spare byte of a tag lane, and a padding lane (bit 64 set: it never matches).
_TAG_END = b"\x00"
_PADDING = bytes(TAG_SIZE) + b"\x01"
_probe_tag = struct.Struct("<Q").unpack_from


def lane_masks(lanes: int) -> tuple[int, int]:
    """``(LOW, FLAG)`` for ``lanes`` lanes: bit 0, and bit 65, of each lane."""
    low = int.from_bytes((b"\x01" + bytes(_LANE_SIZE - 1)) * lanes, "little")
    return low, low << _FLAG_BIT


def zero_lanes(x: int, flag: int) -> int:
    """Bit 65 of each lane of ``x`` that is zero, and no other bit (every lane of ``x``
    must be below ``2 ** 65``, and ``x`` no wider than ``flag``)."""
    return (flag - x) & flag


def lane_of(bit_length: int) -> int:
    """The lane whose bit 65 is the highest set bit (``bit_length`` of it), ``-1`` for 0."""
    return (bit_length - _FLAG_BIT - 1) // _LANE_BITS


class PackedTags:
    """8-byte tags in slots ``[0, len)``, and the scan for a probe's first and last match.

    The bytes are the truth (a change is an O(1) slice write); the packed integers are
    rebuilt from them, a chunk at a time, by the first scan after a change.
    """

    __slots__ = ("_bytes", "_chunks", "_dirty", "_full", "_low", "_width")

    def __init__(self, chunk_lanes: int = CHUNK_LANES) -> None:
        """``chunk_lanes``: lanes per packed integer (tests make it small)."""
        self._width = chunk_lanes
        self._full = lane_masks(chunk_lanes)
        self._bytes = bytearray()
        #: Per chunk: its packed lanes and its ``FLAG``.
        self._chunks: list[tuple[int, int]] = []
        #: ``LOW`` of the first chunk, the widest.
        self._low = 0
        self._dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._bytes) // _LANE_SIZE

    def append(self, tag: bytes) -> None:
        """Put ``tag[:8]`` in a new last slot."""
        self._dirty.add(len(self) // self._width)
        self._bytes += tag[:TAG_SIZE]
        self._bytes += _TAG_END

    def put(self, slot: int, tag: bytes | bytearray) -> None:
        """Make ``tag[:8]`` the tag of ``slot``."""
        start = slot * _LANE_SIZE
        self._bytes[start : start + TAG_SIZE] = tag[:TAG_SIZE]
        self._dirty.add(slot // self._width)

    def remove(self, slot: int) -> None:
        """Drop ``slot``: the last tag moves into it (as ``PyTable`` moves its entry)."""
        last = len(self) - 1
        start = last * _LANE_SIZE
        if slot != last:
            self.put(slot, self._bytes[start : start + TAG_SIZE])
        del self._bytes[start:]
        self._dirty.add(last // self._width)

    def clear(self) -> None:
        self._bytes.clear()
        self._chunks.clear()
        self._dirty.clear()

    def tag(self, slot: int) -> bytes:
        start = slot * _LANE_SIZE
        return bytes(self._bytes[start : start + TAG_SIZE])

    def first_and_last(self, probe: bytes) -> tuple[int, int]:
        """The first and the last slot whose tag is ``probe[:8]`` (``-1, -1`` if none),
        from the same operations on every chunk, whatever matched where."""
        if self._dirty:
            self._repack()
        if not self._chunks:
            return -1, -1
        repeated = _probe_tag(probe)[0] * self._low
        zeros = [zero_lanes(packed ^ repeated, flag) for packed, flag in self._chunks]
        # A byte per chunk, 1 where a tag matched; its lowest and highest set bit name the
        # first and the last chunk with a match (-1 and the last chunk, all zero, if none).
        hits = int.from_bytes(bytes(map(bool, zeros)), "little")
        first_chunk = ((hits & -hits).bit_length() - 1) >> 3
        last_chunk = (hits.bit_length() - 1) >> 3
        first, last = zeros[first_chunk], zeros[last_chunk]
        width = self._width
        return (
            lane_of((first & -first).bit_length()) + (first != 0) * first_chunk * width,
            lane_of(last.bit_length()) + (last != 0) * last_chunk * width,
        )

    def _repack(self) -> None:
        lanes, width = len(self), self._width
        count = -(-lanes // width)
        chunks = self._chunks
        del chunks[count:]
        chunks.extend([(0, 0)] * (count - len(chunks)))
        if count == 1:
            self._dirty.add(0)  # its width is the table's: its masks change with the size
        for index in self._dirty:
            if index >= count:
                continue
            start = index * width
            used = min(width, lanes - start)
            packed = self._bytes[start * _LANE_SIZE : (start + used) * _LANE_SIZE]
            if count == 1:
                self._low, flag = lane_masks(used)
            else:
                packed += _PADDING * (width - used)
                self._low, flag = self._full
            chunks[index] = (int.from_bytes(packed, "little"), flag)
        self._dirty.clear()
