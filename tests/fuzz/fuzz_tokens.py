"""Fuzz target: the key parser and the credential header extraction.

``check(data)`` holds the invariants for one input; atheris drives it coverage-guided::

    python tests/fuzz/fuzz_tokens.py -atheris_runs=2000000 /tmp/keystile-corpus

and ``tests/verifier/test_fuzz_long.py`` drives it with Hypothesis (a short run by default, a long
one with ``pytest -m slow``). Importing this module needs no atheris, and pytest does not
collect it (its name does not start with ``test_``).

The invariants:

* ``parse_key`` returns a ``ParsedKey`` or raises ``InvalidToken`` (``malformed`` or
  ``bad_checksum``), nothing else; what it accepts is exactly prefix, id, secret and a
  checksum it recomputes, and its ``repr`` never shows the secret;
* ``extract_credential`` returns ``None`` or one ``Credential``, or raises
  ``InvalidRequest``, nothing else; the token is non-empty, has no space or tab and was
  in a header; neither the ``repr`` nor the exception text shows a header value;
* the compiled hit path (``keystile._speedups``, where built) agrees with the pure-Python
  one on the same headers: a hit only where ``split_credential`` finds a cached key, with
  the same entry and the same headers left; declining is allowed only for a bearer token
  the ``key_prefixes`` filter may not claim.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

from keystile import _accel
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.credentials import Credential, extract_credential, split_credential
from keystile.errors import InvalidRequest, InvalidToken
from keystile.principal import APIKeyUser
from keystile.tokens import (
    CHECKSUM_LENGTH,
    MAX_TOKEN_LENGTH,
    ParsedKey,
    _base62,
    generate_key,
    key_matcher,
    parse_key,
)

HEADER_NAMES = (b"authorization", b"x-api-key", b"x-other", b"authorization")
#: A key cached in both hit paths (the seeds carry it, so the fuzzer finds hits).
CACHED_KEY = generate_key()[0].encode()
_KEY = bytes(32)
_PATHS: list[VerifiedKeyCache] = []
if _accel.Table is not None:
    _PATHS = [VerifiedKeyCache(compiled=True, key=_KEY), VerifiedKeyCache(compiled=False, key=_KEY)]
    _ENTRY = CachedKey(APIKeyUser(key_id="cached", owner="o", name="n"), None, 0.0)
    for _cache in _PATHS:
        _cache.insert(_cache.digest(CACHED_KEY), _ENTRY, now=0.0, epoch=0)
_IS_OURS = key_matcher(("ks",))


def check_parse(data: bytes) -> ParsedKey | None:
    try:
        parsed = parse_key(data)
    except InvalidToken as exc:
        assert exc.reason in ("malformed", "bad_checksum"), exc.reason
        return None
    body = f"{parsed.prefix}_{parsed.key_id}_{parsed.secret}".encode()
    checksum = _base62(zlib.crc32(body), CHECKSUM_LENGTH).encode()
    assert data == body + checksum, data
    assert parsed.secret not in repr(parsed)
    assert parse_key(data.decode("ascii")) == parsed  # the str form agrees
    return parsed


def headers_from(data: bytes) -> list[tuple[bytes, bytes]]:
    """Lines of ``data``, each a header: the first byte picks the name, the rest is the value."""
    return [
        (HEADER_NAMES[line[0] % len(HEADER_NAMES)], line[1:]) for line in data.split(b"\n") if line
    ]


def check_extract(data: bytes) -> Credential | None:
    headers = headers_from(data)
    try:
        credential = extract_credential(headers, b"x-api-key")
    except InvalidRequest as exc:
        assert exc.reason in ("empty_token", "malformed_header", "conflicting_credentials")
        for _, value in headers:
            for word in value.split():
                assert len(word) < 8 or word.decode("latin-1") not in str(exc)
        return None
    if credential is None:
        return None
    token = credential.token
    assert token and b" " not in token and b"\t" not in token
    assert any(token in value for _, value in headers)
    assert credential.source in ("authorization", "x-api-key")
    assert repr(credential) == f"Credential(source={credential.source!r})"
    return credential


def check_hit(data: bytes) -> None:
    """The compiled hit path agrees with the pure-Python one (where it is built)."""
    if not _PATHS:
        return
    compiled, pure = _PATHS
    headers = headers_from(data)
    for prefixes, is_ours in ((None, None), ((b"ks_",), _IS_OURS)):
        got = compiled.hit_request(headers, b"x-api-key", prefixes, True)
        try:
            token, _, without = split_credential(headers, b"x-api-key", is_ours)
        except InvalidRequest:
            token = without = None
        want = None
        if token is not None and len(token) <= MAX_TOKEN_LENGTH:
            want = pure.lookup(pure.digest(token), 0.0)
        if got is not None:
            assert want is not None and got[0] is want.user and got[2] == without, headers
        elif want is not None:
            assert _may_decline(headers, prefixes), headers


def _may_decline(headers: list[tuple[bytes, bytes]], prefixes: tuple[bytes, ...] | None) -> bool:
    """Requests the compiled path may leave to Python although they hit: a bearer token
    the filter may not claim, or more than 8 credential headers."""
    credentials = 0
    for name, value in headers:
        if name == b"authorization":
            parts = value.split(None, 1)
            if parts and parts[0].lower() == b"bearer":
                credentials += 1
                token = parts[1].strip() if len(parts) == 2 else b""
                if prefixes is not None and token and not token.startswith(prefixes):
                    return True
        elif name == b"x-api-key":
            credentials += 1
    return credentials > 8


def check(data: bytes) -> None:
    """Every invariant above, for one input."""
    check_parse(data)
    credential = check_extract(data)
    if credential is not None:
        check_parse(credential.token)
    check_hit(data)


def seeds() -> list[bytes]:
    """Valid keys and near misses, so a fresh corpus starts close to the interesting shapes."""
    key = generate_key()[0].encode()
    return [
        key,
        b"\x00Bearer " + CACHED_KEY,
        b"\x01" + CACHED_KEY + b"\n\x00bearer " + CACHED_KEY + b"\n\x02x",
        key[:-1] + b"0",
        b"\x00Bearer " + key,
        b"\x01" + key + b"\n\x00bearer\t" + key,
        b"\x00Basic abc\n\x01" + key,
        generate_key(prefix="abcdefghijklmnop")[0].encode(),
    ]


def main() -> None:
    import atheris  # only the fuzzing run needs it: pip install atheris

    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if not any(path.iterdir()):
            for i, seed in enumerate(seeds()):
                (path / f"seed-{i}").write_bytes(seed)
    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
