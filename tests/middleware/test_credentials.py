"""Reading the presented key out of request headers (``keystile.credentials``)."""

from __future__ import annotations

import pytest

from hitpaths import COMPILED_AVAILABLE
from keystile.cache import CachedKey, VerifiedKeyCache
from keystile.credentials import Credential, extract_credential, split_credential
from keystile.errors import InvalidRequest
from keystile.principal import APIKeyUser

KEY = b"ks_0123456789ab_secretsecretsecretsecretsecretsecretsecr123456"
OTHER = b"ks_ba9876543210_othersecretothersecretothersecretothersec654321"
X_API_KEY = b"x-api-key"

Headers = list[tuple[bytes, bytes]]


def extract(headers: Headers, header_name: bytes = X_API_KEY) -> Credential | None:
    return extract_credential(headers, header_name)


def refusal(headers: Headers, header_name: bytes = X_API_KEY) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        extract_credential(headers, header_name)
    return info.value


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"BeArEr"])
def test_bearer_any_case(scheme: bytes) -> None:
    """``Authorization: Bearer <key>`` is read whatever the scheme's case."""
    assert extract([(b"authorization", scheme + b" " + KEY)]) == Credential(KEY, "authorization")


def test_x_api_key_header() -> None:
    """``X-API-Key: <key>`` is read, with the header name as its source."""
    assert extract([(b"x-api-key", KEY)]) == Credential(KEY, "x-api-key")


def test_custom_header_name() -> None:
    """A configured header name is read and reported as the source."""
    assert extract([(b"x-my-key", KEY)], b"x-my-key") == Credential(KEY, "x-my-key")


def test_custom_header_name_ignores_default() -> None:
    """With a custom header name configured, ``X-API-Key`` is not read."""
    assert extract([(b"x-api-key", KEY)], b"x-my-key") is None


def test_no_headers_is_none() -> None:
    """A request with no headers presents no credential."""
    assert extract([]) is None


def test_unrelated_headers_are_none() -> None:
    """Headers other than the two credential headers are ignored."""
    assert extract([(b"host", b"example.com"), (b"cookie", b"k=" + KEY)]) is None


def test_surrounding_whitespace_is_trimmed() -> None:
    """Spaces around the key and between scheme and key are not part of it."""
    assert extract([(b"authorization", b"Bearer   " + KEY + b"  ")]).token == KEY  # type: ignore[union-attr]
    assert extract([(b"x-api-key", b" " + KEY + b"\t")]).token == KEY  # type: ignore[union-attr]


def test_both_headers_same_key_is_one_credential() -> None:
    """The same key in both headers is one credential, read from ``Authorization``."""
    headers = [(b"authorization", b"Bearer " + KEY), (b"x-api-key", KEY)]
    assert extract(headers) == Credential(KEY, "authorization")


def test_both_headers_different_keys_conflict() -> None:
    """Two different keys in the two headers is a 400 ``conflicting_credentials``."""
    exc = refusal([(b"authorization", b"Bearer " + KEY), (b"x-api-key", OTHER)])
    assert exc.reason == "conflicting_credentials"
    assert exc.status_code == 400
    assert exc.error == "invalid_request"


def test_repeated_authorization_different_keys_conflict() -> None:
    """``Authorization`` repeated with two different keys conflicts."""
    exc = refusal([(b"authorization", b"Bearer " + KEY), (b"authorization", b"Bearer " + OTHER)])
    assert exc.reason == "conflicting_credentials"


def test_repeated_x_api_key_different_keys_conflict() -> None:
    """``X-API-Key`` repeated with two different keys conflicts."""
    exc = refusal([(b"x-api-key", KEY), (b"x-api-key", OTHER)])
    assert exc.reason == "conflicting_credentials"


def test_repeated_authorization_same_key_is_one_credential() -> None:
    """``Authorization`` repeated with the same key is one credential."""
    headers = [(b"authorization", b"Bearer " + KEY), (b"authorization", b"bearer " + KEY)]
    assert extract(headers) == Credential(KEY, "authorization")


def test_conflict_message_names_no_key() -> None:
    """The conflict error carries neither of the two keys."""
    exc = refusal([(b"authorization", b"Bearer " + KEY), (b"x-api-key", OTHER)])
    for token in (KEY.decode(), OTHER.decode()):
        assert token not in str(exc)
        assert token not in exc.description
        assert token not in repr(exc)


@pytest.mark.parametrize("value", [b"Bearer", b"Bearer ", b"Bearer    ", b"bearer \t "])
def test_bearer_without_token_is_empty_token(value: bytes) -> None:
    """``Bearer`` with no token, or only whitespace, is a 400 ``empty_token``."""
    exc = refusal([(b"authorization", value)])
    assert exc.reason == "empty_token"
    assert exc.source == "authorization"
    assert exc.status_code == 400


@pytest.mark.parametrize("value", [b"", b"   ", b"\t", b" \t "])
def test_empty_x_api_key_is_no_credential(value: bytes) -> None:
    """An empty or blank ``X-API-Key`` is as if none were sent (FastAPI's
    ``APIKeyHeader`` reads it so): no credential, not a malformed request."""
    assert extract([(b"x-api-key", value)]) is None
    assert extract([(b"x-api-key", value), (b"x-api-key", b"")]) is None


def test_bearer_without_token_beside_a_key_is_still_empty_token() -> None:
    """``Bearer`` with no token is a malformed request even beside a valid ``X-API-Key``."""
    exc = refusal([(b"x-api-key", KEY), (b"authorization", b"Bearer ")])
    assert exc.reason == "empty_token"
    assert exc.source == "authorization"


@pytest.mark.parametrize("empty_first", [True, False])
@pytest.mark.parametrize("value", [b"", b"  "])
def test_empty_x_api_key_beside_a_bearer_key_reads_the_bearer(
    value: bytes, empty_first: bool
) -> None:
    """An empty ``X-API-Key`` beside ``Authorization: Bearer <key>`` is no second key."""
    headers = [(b"x-api-key", value), (b"authorization", b"Bearer " + KEY)]
    if not empty_first:
        headers.reverse()
    assert extract(headers) == Credential(KEY, "authorization")


def test_empty_x_api_key_is_stripped_with_the_credential() -> None:
    """The empty API-key header leaves the scope with the key: the app sees neither."""
    headers = [
        (b"host", b"h"),
        (b"x-api-key", b""),
        (b"authorization", b"Bearer " + KEY),
        (b"x-api-key", b" "),
    ]
    token, source, without = split_credential(headers, X_API_KEY)
    assert (token, source, without) == (KEY, "authorization", [(b"host", b"h")])


@pytest.mark.skipif(not COMPILED_AVAILABLE, reason="keystile._speedups not in use")
@pytest.mark.parametrize("prefixes", [None, (b"ks_",)])
def test_compiled_walk_reads_an_empty_x_api_key_as_python_does(
    prefixes: tuple[bytes, ...] | None,
) -> None:
    """The compiled hit path takes the bearer key beside an empty ``X-API-Key`` itself,
    removing both headers as ``split_credential`` does; alone, the empty header is no hit
    (Python answers the 401) and ``Bearer`` without a token is left to Python's 400."""
    cache = VerifiedKeyCache(compiled=True)
    cached = CachedKey(APIKeyUser(key_id="0123456789ab", owner="o", name="n"), None, 0.0)
    assert cache.insert(cache.digest(KEY), cached, now=0.0, epoch=cache.epoch)
    assert cache.hit_request is not None
    headers = [(b"x-api-key", b" "), (b"host", b"h"), (b"authorization", b"Bearer " + KEY)]
    found = cache.hit_request(headers, X_API_KEY, prefixes, True)
    assert found is not None
    assert found[0] is cached.user
    assert found[2] == split_credential(headers, X_API_KEY)[2] == [(b"host", b"h")]
    assert cache.hit_request([(b"x-api-key", b"")], X_API_KEY, prefixes, True) is None
    with_empty_bearer = [(b"x-api-key", KEY), (b"authorization", b"Bearer ")]
    assert cache.hit_request(with_empty_bearer, X_API_KEY, prefixes, True) is None


def test_empty_x_api_key_does_not_hide_two_different_keys() -> None:
    """An empty header among two different keys leaves the conflict a 400."""
    exc = refusal(
        [(b"x-api-key", b""), (b"x-api-key", KEY), (b"authorization", b"Bearer " + OTHER)]
    )
    assert exc.reason == "conflicting_credentials"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwYXNz", b"Digest abc", b"Token " + KEY, b""])
def test_other_authorization_schemes_are_ignored(value: bytes) -> None:
    """A non-Bearer (or empty) ``Authorization`` is as if nothing were sent."""
    assert extract([(b"authorization", value)]) is None


def test_basic_alongside_x_api_key_reads_x_api_key() -> None:
    """``Authorization: Basic`` does not hide or conflict with an ``X-API-Key``."""
    headers = [(b"authorization", b"Basic dXNlcjpwYXNz"), (b"x-api-key", KEY)]
    assert extract(headers) == Credential(KEY, "x-api-key")


def test_bearer_prefix_of_longer_scheme_is_ignored() -> None:
    """A scheme that merely starts with ``Bearer`` is not Bearer."""
    assert extract([(b"authorization", b"BearerX " + KEY)]) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"authorization", b"Bearer " + KEY + b" extra"),
        (b"authorization", b"Bearer " + KEY + b"\textra"),
        (b"x-api-key", KEY + b" extra"),
        (b"x-api-key", KEY + b"\textra"),
    ],
)
def test_whitespace_inside_token_is_malformed_header(name: bytes, value: bytes) -> None:
    """A space or tab inside the token is a 400 ``malformed_header``."""
    exc = refusal([(name, value)])
    assert exc.reason == "malformed_header"
    assert exc.status_code == 400


def test_non_ascii_bytes_pass_through() -> None:
    """Non-ASCII bytes are handed on as bytes, undecoded (the verifier rejects them)."""
    token = b"\xff\xfe\xc3\xa9key"
    assert extract([(b"authorization", b"Bearer " + token)]) == Credential(token, "authorization")
    assert extract([(b"x-api-key", token)]) == Credential(token, "x-api-key")


def test_credential_repr_hides_token() -> None:
    """``repr`` of a credential shows its source but never the token."""
    credential = extract([(b"x-api-key", KEY)])
    assert credential is not None
    assert "x-api-key" in repr(credential)
    assert KEY.decode() not in repr(credential)
    assert KEY.decode() not in str(credential)


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        (
            [(b"authorization", b"Bearer one"), (b"x-api-key", b"two")],
            ["Authorization", "x-api-key"],
        ),
        (
            [(b"x-api-key", b"one"), (b"authorization", b"Bearer two")],
            ["x-api-key", "Authorization"],
        ),
        ([(b"x-api-key", b"one"), (b"x-api-key", b"two")], ["x-api-key", "twice"]),
        ([(b"authorization", b"Bearer one"), (b"authorization", b"Bearer two")], ["twice"]),
    ],
)
def test_conflict_names_both_sources(headers: list[tuple[bytes, bytes]], named: list[str]) -> None:
    """The 400 for two different keys says which headers carried them."""
    with pytest.raises(InvalidRequest) as refused:
        extract_credential(headers, b"x-api-key")
    assert refused.value.reason == "conflicting_credentials"
    for word in named:
        assert word in refused.value.description
