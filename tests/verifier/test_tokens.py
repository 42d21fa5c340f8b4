"""The key format: generate, parse, checksum and redact (``keystile.tokens``)."""

from __future__ import annotations

import secrets
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystile.errors import ConfigurationError, InvalidToken
from keystile.tokens import (
    DEFAULT_PREFIX,
    MAX_TOKEN_LENGTH,
    ParsedKey,
    generate_key,
    new_key_id,
    normalize_key_id,
    parse_key,
    redact,
    validate_prefix,
)

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
PREFIX_CHARS = string.ascii_lowercase + string.digits
#: Every character a key may contain: a substitution from this set keeps the key ASCII.
KEY_CHARS = BASE62 + "_"

valid_prefixes = st.from_regex(r"[a-z][a-z0-9]{0,15}", fullmatch=True)
invalid_prefixes = st.text(max_size=20).filter(
    lambda p: (
        not (
            1 <= len(p) <= 16
            and p[0] in string.ascii_lowercase
            and all(c in PREFIX_CHARS for c in p)
        )
    )
)

#: Prefix lengths at both bounds and in between, for the exhaustive mutation tests.
MUTATION_PREFIXES = ["k", DEFAULT_PREFIX, "a1b2c3d4e5f6g7h8"]


def _well_shaped(token: str) -> bool:
    """An independent statement of the format's shape (everything but the checksum)."""
    parts = token.split("_")
    if len(parts) != 3:
        return False
    prefix, key_id, tail = parts
    return (
        1 <= len(prefix) <= 16
        and prefix[0] in string.ascii_lowercase
        and all(c in PREFIX_CHARS for c in prefix)
        and len(key_id) == 12
        and all(c in BASE62 for c in key_id)
        and len(tail) == 43 + 6
        and all(c in BASE62 for c in tail)
    )


def _expected_reason(mutated: str) -> str:
    return "bad_checksum" if _well_shaped(mutated) else "malformed"


def _reject_reason(token: str | bytes) -> str:
    with pytest.raises(InvalidToken) as info:
        parse_key(token)
    return info.value.reason


def _base62_decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + BASE62.index(char)
    return value


@settings(max_examples=50, deadline=None)
@given(prefix=valid_prefixes)
def test_generate_parse_round_trip(prefix: str) -> None:
    """A generated key parses back to the same prefix, key id and secret."""
    plaintext, parsed = generate_key(prefix)
    assert parse_key(plaintext) == parsed
    assert parsed.prefix == prefix
    assert plaintext.startswith(f"{prefix}_{parsed.key_id}_{parsed.secret}")


def test_generate_uses_default_prefix() -> None:
    """Without a prefix the key starts with ``ks_``."""
    plaintext, parsed = generate_key()
    assert parsed.prefix == DEFAULT_PREFIX == "ks"
    assert plaintext.startswith("ks_")


def test_generate_keeps_given_key_id() -> None:
    """A key id passed to ``generate_key`` is the one the key carries."""
    key_id = new_key_id()
    plaintext, parsed = generate_key(key_id=key_id)
    assert parsed.key_id == key_id
    assert parse_key(plaintext).key_id == key_id


@pytest.mark.parametrize("key_id", ["short", "has_underscore", "x" * 13, "ÄÖÜäöüßABCDE"])
def test_generate_rejects_key_id_that_cannot_parse(key_id: str) -> None:
    """``generate_key`` refuses a key id that would mint a key ``parse_key`` rejects."""
    with pytest.raises(ValueError):
        generate_key(key_id=key_id)


def test_str_and_bytes_parse_alike() -> None:
    """A key given as ``str`` or as ``bytes`` parses to the same parts."""
    plaintext, parsed = generate_key()
    assert parse_key(plaintext) == parse_key(plaintext.encode("ascii")) == parsed


def test_key_parts_have_documented_lengths() -> None:
    """The key id is 12 base62 characters and the secret 43, then a 6-character checksum."""
    plaintext, parsed = generate_key("ks")
    assert len(parsed.key_id) == 12
    assert len(parsed.secret) == 43
    assert set(parsed.key_id + parsed.secret) <= set(BASE62)
    assert len(plaintext) == len("ks_") + 12 + 1 + 43 + 6


def test_secret_carries_256_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """43 base62 characters hold 256 bits, and the largest 256-bit value survives intact."""
    assert 62**43 >= 2**256
    requested: list[int] = []

    def all_ones(n: int) -> bytes:
        requested.append(n)
        return b"\xff" * n

    monkeypatch.setattr(secrets, "token_bytes", all_ones)
    _, parsed = generate_key()
    assert requested == [32]
    assert _base62_decode(parsed.secret) == 2**256 - 1


def test_secrets_never_repeat() -> None:
    """Two thousand generated keys have two thousand different secrets and key ids."""
    keys = [generate_key()[1] for _ in range(2000)]
    assert len({k.secret for k in keys}) == len(keys)
    assert len({k.key_id for k in keys}) == len(keys)


@pytest.mark.parametrize("prefix", MUTATION_PREFIXES)
def test_every_substitution_is_rejected(prefix: str) -> None:
    """Replacing any one character by any other key character is rejected with the right reason."""
    plaintext, _ = generate_key(prefix)
    for position, original in enumerate(plaintext):
        for char in KEY_CHARS:
            if char == original:
                continue
            mutated = plaintext[:position] + char + plaintext[position + 1 :]
            assert _reject_reason(mutated) == _expected_reason(mutated), (position, char)


@pytest.mark.parametrize("prefix", MUTATION_PREFIXES)
def test_every_deletion_is_rejected(prefix: str) -> None:
    """Deleting any one character is rejected: ``bad_checksum`` in the prefix, else malformed."""
    plaintext, _ = generate_key(prefix)
    for position in range(len(plaintext)):
        mutated = plaintext[:position] + plaintext[position + 1 :]
        assert _reject_reason(mutated) == _expected_reason(mutated), position


@pytest.mark.parametrize("prefix", MUTATION_PREFIXES)
def test_every_insertion_is_rejected(prefix: str) -> None:
    """Inserting any key character anywhere is rejected with the right reason."""
    plaintext, _ = generate_key(prefix)
    for position in range(len(plaintext) + 1):
        for char in KEY_CHARS:
            mutated = plaintext[:position] + char + plaintext[position:]
            assert _reject_reason(mutated) == _expected_reason(mutated), (position, char)


@settings(max_examples=100, deadline=None)
@given(
    prefix=valid_prefixes,
    data=st.data(),
    char=st.characters(exclude_characters=KEY_CHARS, codec="utf-8"),
)
def test_substitution_outside_key_alphabet_is_malformed(
    prefix: str, data: st.DataObject, char: str
) -> None:
    """Any character outside base62 and ``_`` (non-ASCII included) makes the key malformed."""
    plaintext, _ = generate_key(prefix)
    position = data.draw(st.integers(0, len(plaintext) - 1))
    mutated = plaintext[:position] + char + plaintext[position + 1 :]
    assert _reject_reason(mutated) == "malformed"
    assert _reject_reason(mutated.encode("utf-8")) == "malformed"


def test_longest_valid_key_parses() -> None:
    """A key with a 16-character prefix is exactly ``MAX_TOKEN_LENGTH`` long and parses."""
    plaintext, parsed = generate_key("p" * 16)
    assert len(plaintext) == MAX_TOKEN_LENGTH
    assert parse_key(plaintext) == parsed


def test_over_long_input_is_malformed() -> None:
    """Anything longer than the longest valid key is rejected as malformed."""
    plaintext, _ = generate_key("p" * 16)
    assert _reject_reason(plaintext + "A") == "malformed"
    assert _reject_reason(b"A" * 1_000_000) == "malformed"


@pytest.mark.parametrize("token", ["", b""])
def test_empty_input_is_malformed(token: str | bytes) -> None:
    """An empty key is malformed."""
    assert _reject_reason(token) == "malformed"


@pytest.mark.parametrize("padding", [" ", "\n", "\t", "\x00"])
def test_surrounding_whitespace_is_malformed(padding: str) -> None:
    """A key followed or preceded by whitespace or NUL is malformed (no trimming)."""
    plaintext, _ = generate_key()
    assert _reject_reason(plaintext + padding) == "malformed"
    assert _reject_reason(padding + plaintext) == "malformed"


@pytest.mark.parametrize("raw", [b"\xff", b"\x80", b"\xc3\xa9"])
def test_non_ascii_bytes_are_malformed(raw: bytes) -> None:
    """Non-ASCII bytes inside a key (valid UTF-8 or not) make it malformed."""
    plaintext, parsed = generate_key()
    encoded = plaintext.encode("ascii")
    position = encoded.index(parsed.secret.encode("ascii")) + 5
    mutated = encoded[:position] + raw + encoded[position + len(raw) :]
    assert _reject_reason(mutated) == "malformed"


def test_lone_surrogate_str_is_malformed() -> None:
    """A ``str`` that cannot be encoded (lone surrogate) is malformed, not a crash."""
    plaintext, _ = generate_key()
    assert _reject_reason(plaintext[:-1] + "\udcff") == "malformed"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=MAX_TOKEN_LENGTH + 5))
def test_random_bytes_are_rejected(raw: bytes) -> None:
    """Random bytes never parse (they fail the shape or the checksum)."""
    assert _reject_reason(raw) in {"malformed", "bad_checksum"}


def test_invalid_token_reason_is_not_the_key() -> None:
    """The exception raised for a bad checksum does not carry the presented key."""
    plaintext, parsed = generate_key()
    mutated = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    with pytest.raises(InvalidToken) as info:
        parse_key(mutated)
    assert parsed.secret not in str(info.value)
    assert parsed.secret not in repr(info.value)


@settings(max_examples=30, deadline=None)
@given(prefix=valid_prefixes)
def test_redact_shows_no_secret(prefix: str) -> None:
    """``redact`` shows the prefix and key id and nothing of the secret."""
    _, parsed = generate_key(prefix)
    shown = redact(parsed.key_id, parsed.prefix)
    assert shown == f"{prefix}_{parsed.key_id}…"
    assert parsed.secret not in shown
    assert parsed.secret[:8] not in shown
    assert parsed.redacted == shown


def test_parsed_key_repr_hides_secret() -> None:
    """``repr(ParsedKey)`` names the key id but never the secret."""
    plaintext, parsed = generate_key()
    text = repr(parse_key(plaintext))
    assert parsed.key_id in text
    assert parsed.secret not in text
    assert parsed.secret not in str(parsed)


def test_parsed_key_equality_includes_secret() -> None:
    """Two parsed keys differing only in the secret are not equal."""
    assert ParsedKey("ks", "a" * 12, "b" * 43) != ParsedKey("ks", "a" * 12, "c" * 43)


@settings(max_examples=100, deadline=None)
@given(prefix=valid_prefixes)
def test_valid_prefix_accepted(prefix: str) -> None:
    """``validate_prefix`` returns a valid prefix unchanged."""
    assert validate_prefix(prefix) == prefix


@settings(max_examples=100, deadline=None)
@given(prefix=invalid_prefixes)
def test_invalid_prefix_raises_configuration_error(prefix: str) -> None:
    """An invalid prefix is a ``ConfigurationError`` from both validation and generation."""
    with pytest.raises(ConfigurationError):
        validate_prefix(prefix)
    with pytest.raises(ConfigurationError):
        generate_key(prefix)


@pytest.mark.parametrize("prefix", ["", "KS", "1ks", "k_s", "ks-", "a" * 17, "ks\n", "é"])
def test_listed_invalid_prefixes(prefix: str) -> None:
    """Empty, uppercase, digit-first, punctuated, too long and non-ASCII prefixes are refused."""
    with pytest.raises(ConfigurationError):
        validate_prefix(prefix)


def test_normalize_key_id_takes_the_id_out_of_a_whole_key() -> None:
    """A whole key given where an id is expected yields its id, never its secret."""
    key, parsed = generate_key("acme")
    assert normalize_key_id(key) == parsed.key_id
    assert normalize_key_id(f"  {redact(parsed.key_id, 'acme')} ") == parsed.key_id
    assert normalize_key_id("not-an-id") == "not-an-id"
