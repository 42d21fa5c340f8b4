"""The regular expression to register with a secret scanner: it finds every key keystile
mints, with the prefixes configured, wherever it sits in a file, and none of the other
token formats a repository is full of."""

from __future__ import annotations

import re

import pytest

from keystile.tokens import generate_key, scanning_pattern

PREFIXES = ["ks", "acme", "k1", "sk", "live"]

#: Tokens of other products (made-up values in their documented shapes).
OTHER_TOKENS = {
    "GitHub classic PAT": "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
    "GitHub fine-grained PAT": "github_pat_11ABCDEFG0" + "a" * 12 + "_" + "B" * 59,
    "GitHub OAuth token": "gho_" + "z" * 36,
    "AWS access key id": "AKIAIOSFODNN7EXAMPLE",
    "AWS secret key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "Stripe secret key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc" * 4,
    "Stripe test key": "sk_test_" + "51H" + "x" * 96,
    "Stripe restricted key": "rk_live_" + "a1" * 12,
    "JWT": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    "Slack bot token": "xoxb-" + "1234567890-1234567890123-" + "a" * 24,
    "Slack webhook": "https://hooks.slack.com/services/T000/B000/" + "X" * 24,
    "djangorestframework-api-key": "Ab1Cd2Ef.GhIjKlMnOpQrStUvWxYz0123456789ab",
    "OpenAI key": "sk-proj-" + "A" * 48,
    "Google API key": "AIza" + "S" * 35,
    "UUID": "123e4567-e89b-12d3-a456-426614174000",
    "keystile display form": "ks_AbC123def456…",
    "a key cut short": generate_key("ks")[0][:-1],
    "a key with a character more": generate_key("ks")[0] + "x",
}


@pytest.mark.parametrize("prefix", PREFIXES)
def test_matches_every_generated_key_whole(prefix: str) -> None:
    pattern = re.compile(scanning_pattern(PREFIXES))
    for _ in range(500):
        key, _parts = generate_key(prefix)
        assert pattern.fullmatch(key), key[:20]
        found = pattern.findall(f'API_KEY="{key}"\nexport TOKEN={key} # {key}.')
        assert found == [key] * 3


def test_the_default_pattern_is_the_documented_one() -> None:
    assert scanning_pattern() == r"\bks_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}\b"
    assert scanning_pattern(["ks", "acme"]) == (r"\b(?:ks|acme)_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}\b")


@pytest.mark.parametrize("name", sorted(OTHER_TOKENS))
def test_matches_no_other_token_format(name: str) -> None:
    pattern = re.compile(scanning_pattern(PREFIXES))
    token = OTHER_TOKENS[name]
    assert pattern.search(token) is None
    assert pattern.search(f"value = '{token}'\n") is None


def test_a_key_of_another_prefix_is_not_matched() -> None:
    key, _ = generate_key("other")
    assert re.search(scanning_pattern(["ks"]), key) is None
