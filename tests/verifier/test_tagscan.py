"""The pure-Python tag scan (``keystile.tagscan``) against plain loops over the lanes."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keystile.tagscan
from keystile.tagscan import CHUNK_LANES, PackedTags, lane_masks, lane_of, zero_lanes

LANE_BITS = 72
FLAG_BIT = 65
TOP = (1 << 64) - 1

# Tag values where a lane-wise trick goes wrong first: zero, one, the top bit alone, all
# ones, and values one off them.
EDGE_TAGS = [0, 1, 2, 1 << 63, (1 << 63) - 1, (1 << 63) + 1, TOP, TOP - 1]
tag_values = st.one_of(st.sampled_from(EDGE_TAGS), st.integers(0, TOP))
#: A padding lane: bit 64 set over any tag bits.
padding_values = tag_values.map(lambda t: (1 << 64) | t)


def distinct_tags(count: int, seed: int) -> list[int]:
    """``count`` different nonzero 64-bit tags."""
    rng = random.Random(seed)
    values: dict[int, None] = {}
    while len(values) < count:
        values[rng.getrandbits(64) | 1] = None
    return list(values)


def pack(lanes: list[int]) -> int:
    return sum(value << (LANE_BITS * i) for i, value in enumerate(lanes))


def tag_bytes(value: int) -> bytes:
    return value.to_bytes(8, "little")


def naive_first_and_last(tags: list[int], probe: int) -> tuple[int, int]:
    matches = [i for i, tag in enumerate(tags) if tag == probe]
    return (matches[0], matches[-1]) if matches else (-1, -1)


@settings(max_examples=600, deadline=None)
@given(lanes=st.lists(st.one_of(tag_values, padding_values), min_size=1, max_size=40))
def test_zero_lanes_marks_exactly_the_zero_lanes(lanes: list[int]) -> None:
    """Bit 65 of a lane is set exactly where the lane is 0, whatever its neighbours hold
    (no borrow crosses a lane), and no other bit is set."""
    _, flag = lane_masks(len(lanes))
    expected = sum(1 << (LANE_BITS * i + FLAG_BIT) for i, v in enumerate(lanes) if v == 0)
    assert zero_lanes(pack(lanes), flag) == expected


@settings(max_examples=400, deadline=None)
@given(tags=st.lists(tag_values, min_size=1, max_size=40), probe=tag_values)
def test_xor_with_the_repeated_probe_zeroes_the_matching_lanes(tags: list[int], probe: int) -> None:
    """``probe * LOW`` repeats the probe in every lane: the xor is zero exactly where the tag is."""
    low, flag = lane_masks(len(tags))
    zero = zero_lanes(pack(tags) ^ probe * low, flag)
    assert [bool(zero >> (LANE_BITS * i + FLAG_BIT) & 1) for i in range(len(tags))] == [
        t == probe for t in tags
    ]


@pytest.mark.parametrize("lane", [0, 1, 2, 511, 512, 100_000])
def test_lane_of_inverts_the_bit_length_of_a_flag(lane: int) -> None:
    """The bit length of a lane's flag bit names that lane; 0 names none (-1)."""
    assert lane_of((1 << (LANE_BITS * lane + FLAG_BIT)).bit_length()) == lane
    assert lane_of(0) == -1


SMALL_POOL = [0, 1, 1 << 63, TOP, 0x0101010101010101]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from(SMALL_POOL)),
        st.tuples(st.just("append"), st.sampled_from(SMALL_POOL)),
        st.tuples(st.just("append"), tag_values),
        st.tuples(st.just("put"), st.integers(0, 10_000), st.sampled_from(SMALL_POOL)),
        st.tuples(st.just("remove"), st.integers(0, 10_000)),
        st.tuples(st.just("scan"), st.sampled_from(SMALL_POOL)),
        st.tuples(st.just("scan"), tag_values),
        st.tuples(st.just("bulk"), st.integers(1, 30)),
        st.just(("clear",)),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops=operations, chunk_lanes=st.sampled_from([1, 2, 3, 5, 8]), seed=st.integers(0, 2**32))
def test_packed_tags_agree_with_a_list(
    ops: list[tuple[Any, ...]], chunk_lanes: int, seed: int
) -> None:
    """Under appends, overwrites, swap-removes and clears, across chunk boundaries and the
    padded last chunk, every scan finds the first and last slot a plain loop finds."""
    rng = random.Random(seed)
    tags = PackedTags(chunk_lanes)
    oracle: list[int] = []
    for op in ops:
        kind = op[0]
        if kind == "append":
            tags.append(tag_bytes(op[1]) + b"rest of the digest")
            oracle.append(op[1])
        elif kind == "bulk":
            for _ in range(op[1]):
                value = rng.choice(SMALL_POOL) if rng.random() < 0.2 else rng.getrandbits(64)
                tags.append(tag_bytes(value))
                oracle.append(value)
        elif kind == "put" and oracle:
            slot = op[1] % len(oracle)
            tags.put(slot, tag_bytes(op[2]))
            oracle[slot] = op[2]
        elif kind == "remove" and oracle:
            slot = op[1] % len(oracle)
            tags.remove(slot)
            oracle[slot] = oracle[-1]
            oracle.pop()
        elif kind == "clear":
            tags.clear()
            oracle.clear()
        elif kind == "scan":
            assert tags.first_and_last(tag_bytes(op[1])) == naive_first_and_last(oracle, op[1])
        assert len(tags) == len(oracle)
    assert [tags.tag(i) for i in range(len(oracle))] == [tag_bytes(t) for t in oracle]
    for probe in {*SMALL_POOL, *oracle}:
        assert tags.first_and_last(tag_bytes(probe)) == naive_first_and_last(oracle, probe)


@pytest.mark.parametrize("size", [1, 2, CHUNK_LANES - 1, CHUNK_LANES, CHUNK_LANES + 1, 1500])
def test_every_slot_is_found_at_the_real_chunk_width(size: int) -> None:
    """At the chunk width in use, each slot's tag is found at its slot, an absent one nowhere."""
    values = distinct_tags(size, size)
    tags = PackedTags()
    for value in values:
        tags.append(tag_bytes(value))
    for slot, value in enumerate(values):
        assert tags.first_and_last(tag_bytes(value)) == (slot, slot)
    assert tags.first_and_last(tag_bytes(0)) == (-1, -1)


def test_a_padding_lane_never_matches_a_zero_probe() -> None:
    """The padding that fills the last chunk matches no probe, the all-zero one included."""
    tags = PackedTags(4)
    for value in (5, 6, 7, 8, 9):  # two chunks: the second is one tag and three padding lanes
        tags.append(tag_bytes(value))
    assert tags.first_and_last(tag_bytes(0)) == (-1, -1)
    tags.append(tag_bytes(0))
    assert tags.first_and_last(tag_bytes(0)) == (5, 5)


def test_the_same_work_wherever_the_match_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """First, middle, last, two matches or none: the scan runs the same lane operations
    on the same chunks, every chunk of the table."""
    size = 3 * CHUNK_LANES + 7
    values = distinct_tags(size, 7)
    values[-3] = values[2]  # one tag twice
    tags = PackedTags()
    for value in values:
        tags.append(tag_bytes(value))
    tags.first_and_last(tag_bytes(0))  # pack before recording
    calls: list[tuple[int, int]] = []
    real = keystile.tagscan.zero_lanes

    def recording(x: int, flag: int) -> int:
        calls.append((flag.bit_length(), x.bit_length() > flag.bit_length()))
        return real(x, flag)

    monkeypatch.setattr(keystile.tagscan, "zero_lanes", recording)
    traces = {}
    for where, probe in {
        "first": values[0],
        "middle": values[size // 2],
        "last": values[-1],
        "twice": values[2],
        "absent": 0,
    }.items():
        calls.clear()
        found = tags.first_and_last(tag_bytes(probe))
        traces[where] = list(calls)
        assert (found == (-1, -1)) == (where == "absent")
    assert found == (-1, -1)
    assert tags.first_and_last(tag_bytes(values[2])) == (2, size - 3)
    chunks = -(-size // CHUNK_LANES)
    full_width = (LANE_BITS * (CHUNK_LANES - 1) + FLAG_BIT + 1, False)
    assert all(trace == [full_width] * chunks for trace in traces.values())
