"""The fuzz target of ``tests/fuzz/fuzz_tokens.py`` under Hypothesis.

A short run is part of the suite; the long run is marked ``slow`` and runs only when asked
for: ``pytest -m slow`` (50 000 examples) or ``KEYSTILE_LONG_FUZZ=N pytest -m slow``.
Inputs are raw bytes and key-shaped ones: real keys with a few bytes changed, cut or
added, inside header lines.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_tokens import check, check_parse
from keystile.tokens import generate_key

LONG_EXAMPLES = int(os.environ.get("KEYSTILE_LONG_FUZZ") or 50_000)


@st.composite
def key_shaped(draw: st.DrawFn) -> bytes:
    """A real key (any valid prefix), then up to three byte edits."""
    prefix = draw(st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True))
    key = bytearray(generate_key(prefix=prefix)[0].encode())
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(key)))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if edit == "insert":
            key.insert(at, byte)
        elif at < len(key):
            if edit == "replace":
                key[at] = byte
            else:
                del key[at]
    return bytes(key)


@st.composite
def header_lines(draw: st.DrawFn) -> bytes:
    """Header lines as the target reads them: a name byte, then a value around a token."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.binary(min_size=1, max_size=1))
        scheme = draw(st.sampled_from([b"", b"Bearer ", b"bearer\t", b"BEARER  ", b"Basic "]))
        token = draw(st.one_of(key_shaped(), st.binary(max_size=30)))
        lines.append(name + scheme + token.replace(b"\n", b""))
    return b"\n".join(lines)


INPUTS = st.one_of(st.binary(max_size=200), key_shaped(), header_lines())


@settings(max_examples=400, deadline=None)
@given(data=INPUTS)
def test_fuzz_target_holds_on_a_short_run(data: bytes) -> None:
    """The parser and header extraction invariants hold for random and key-shaped bytes."""
    check(data)


def test_fuzz_target_accepts_real_keys() -> None:
    """The target is not vacuous: real keys parse, and one changed byte is refused."""
    key = generate_key()[0].encode()
    assert check_parse(key) is not None
    assert check_parse(key[:-1] + (b"A" if key[-1:] != b"A" else b"B")) is None


@pytest.mark.slow
@settings(max_examples=LONG_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=INPUTS)
def test_fuzz_target_holds_on_a_long_run(long_fuzz: None, data: bytes) -> None:
    """The same invariants over many more inputs (pytest -m slow)."""
    check(data)


@pytest.fixture
def long_fuzz(request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get(
        "KEYSTILE_LONG_FUZZ"
    ):
        pytest.skip("long fuzz run: select it with pytest -m slow (or KEYSTILE_LONG_FUZZ=N)")
