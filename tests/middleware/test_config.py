"""KeystileConfig: the middleware's options, checked once when the middleware is built."""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta
from typing import Any

import pytest

from apps import client, inner_app
from keystile import (
    CHEAPEST_PARAMETERS,
    APIKeyMiddleware,
    ConfigurationError,
    KeyManager,
    KeystileConfig,
    MemoryKeyStore,
)
from keystile.config import DATABASE_URL_ENV, KeystileOptions

pytestmark = pytest.mark.anyio


def middleware(**options: Any) -> APIKeyMiddleware:
    return APIKeyMiddleware(inner_app(), store=MemoryKeyStore(), **options)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("cache_ttl", 0, ValueError),
        ("cache_idle", -1.0, ValueError),
        ("flush_interval", 0, ValueError),
        ("flush_max", 0, ValueError),
        ("cache_max_size", 0, ValueError),
        ("rate_limit_on_error", "maybe", ConfigurationError),
        ("default_rate_limit", "10/fortnight", ConfigurationError),
        ("rate_limit_storage", "mysql://db", ConfigurationError),
        ("key_prefixes", ["KS"], ConfigurationError),
    ],
)
def test_a_bad_value_is_refused_when_the_middleware_is_built(
    name: str, value: object, error: type[Exception]
) -> None:
    """Non-positive TTLs and sizes, unknown enum values, bad rates, storages and prefixes
    raise the same exception types as before, at construction."""
    with pytest.raises(error, match=name if error is ValueError else None):
        middleware(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("argon2_concurrency", 0),
        ("negative_ttl", -1.0),
        ("negative_max_size", -1),
        ("stale_if_error", -1.0),
        ("max_pending_verifications", -1),
        ("per_key_pending", -1),
        ("reap_every", -5.0),
        ("reap_unused_for", timedelta(days=-1)),
        ("usage_retention", timedelta(seconds=-1)),
    ],
)
def test_a_negative_count_or_duration_is_refused(name: str, value: object) -> None:
    """A negative count or duration, or no argon2 worker, is a ValueError naming the option
    (no request would be served sensibly with it)."""
    with pytest.raises(ValueError, match=name):
        middleware(**{name: value})


@pytest.mark.parametrize("name", ["exempt_paths", "key_prefixes"])
def test_a_single_string_where_a_list_is_expected_is_refused(name: str) -> None:
    """``exempt_paths="/health"`` is a TypeError, not the exemption of ``/`` and each letter."""
    with pytest.raises(TypeError, match=name):
        middleware(**{name: "/health" if name == "exempt_paths" else "ks"})


def test_unknown_option_is_a_type_error_naming_it() -> None:
    """A misspelt option fails at construction with its name; ``app`` is not an option."""
    with pytest.raises(TypeError, match="cache_tll"):
        middleware(cache_tll=5)
    with pytest.raises(TypeError, match="app"):
        KeystileConfig.from_options(app=inner_app())


def test_option_names_match_the_signature_and_the_typed_options() -> None:
    """``option_names()``, ``inspect.signature(APIKeyMiddleware)`` and ``KeystileOptions``
    list the same options, with the config's defaults."""
    names = KeystileConfig.option_names()
    parameters = inspect.signature(APIKeyMiddleware).parameters
    assert set(parameters) == {"app", "config", *names}
    assert set(KeystileOptions.__annotations__) == names
    for option in dataclasses.fields(KeystileConfig):
        if option.init:
            assert parameters[option.name].default == option.default, option.name


def test_options_are_parsed_once() -> None:
    """The header name becomes lowercase bytes, exempt paths an exact set and a prefix
    tuple, lists become tuples."""
    config = KeystileConfig(
        store=MemoryKeyStore(),
        header_name="X-Team-Key",
        exempt_paths=["/health", "/static/*"],
        key_prefixes=["acme", "ks"],
    )
    assert config.header == b"x-team-key"
    assert config.exempt_exact == frozenset({"/health"})
    assert config.exempt_prefixes == ("/static/",)
    assert config.exempt_paths == ("/health", "/static/*")
    assert config.key_prefixes == ("acme", "ks")
    assert config.is_key(b"acme_x") and not config.is_key(b"eyJhbGciOi")
    assert config.bearer_filter is None
    optional = KeystileConfig(store=MemoryKeyStore(), required=False, key_prefixes=["acme"])
    assert optional.bearer_filter is optional.is_key
    assert optional.bearer_starts == (b"acme_",)


def test_config_is_frozen_and_hashable() -> None:
    """A config cannot change after it is checked; equal configs are equal values."""
    store = MemoryKeyStore()
    config = KeystileConfig(store=store, exempt_paths=["/health"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache_ttl = 0  # type: ignore[misc]
    same = KeystileConfig(store=store, exempt_paths=("/health",))
    assert config == same and hash(config) == hash(same)


def test_database_url_is_resolved_when_the_config_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The environment is read once; with ``store=`` there is no database URL."""
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:///from-env.db")
    assert KeystileConfig().database_url == "sqlite:///from-env.db"
    assert KeystileConfig(database_url="sqlite:///given.db").database_url == "sqlite:///given.db"
    assert (
        KeystileConfig(store=MemoryKeyStore(), database_url="sqlite:///x.db").database_url is None
    )


def test_repr_never_shows_the_database_password() -> None:
    """A config in a log line or traceback does not carry the database URL's password."""
    config = KeystileConfig(database_url="postgresql://app:s3cret@db.internal/app")
    assert "s3cret" not in repr(config)
    assert "s3cret" not in str(config)


def test_runtime_key_covers_the_runtime_options_only() -> None:
    """Another header or exempt path shares the runtime; another cache TTL does not."""
    store = MemoryKeyStore()
    base = KeystileConfig(store=store)
    assert KeystileConfig(store=store, header_name="X-Key", exempt_paths=["/a"]).runtime_key == (
        base.runtime_key
    )
    assert KeystileConfig(store=store, cache_ttl=5).runtime_key != base.runtime_key
    assert KeystileConfig(store=MemoryKeyStore()).runtime_key != base.runtime_key


async def test_middleware_takes_a_config() -> None:
    """``config=`` serves as the same keywords would; keywords beside it replace its values
    in a copy, checked again."""
    store = MemoryKeyStore()
    created = await KeyManager(store, argon2=CHEAPEST_PARAMETERS).create(owner="acme", name="ci")
    config = KeystileConfig(store=store, argon2=CHEAPEST_PARAMETERS, exempt_paths=["/public"])
    app = APIKeyMiddleware(inner_app(), config=config)
    assert app.config is config
    try:
        async with client(app) as c:
            assert (await c.get("/public")).status_code == 200
            assert (await c.get("/whoami")).status_code == 401
            ok = await c.get("/whoami", headers={"X-API-Key": created.key})
            assert ok.json()["key_id"] == created.id
        replaced = APIKeyMiddleware(inner_app(), config=config, exempt_paths=["/whoami"])
        assert replaced.config.exempt_paths == ("/whoami",)
        assert config.exempt_paths == ("/public",)
        assert replaced.runtime is app.runtime
        with pytest.raises(ValueError, match="cache_ttl"):
            APIKeyMiddleware(inner_app(), config=config, cache_ttl=-1)
    finally:
        await app.aclose()
