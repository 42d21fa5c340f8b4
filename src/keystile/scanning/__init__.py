"""The endpoint for GitHub's secret scanning partner program: a leaked key is revoked,
disabled or reported, and audited as ``leaked``.

::

    from keystile.scanning import secret_scanning_app

    app.mount("/.well-known/secret-scanning", secret_scanning_app(action="revoke"))

``keystile.tokens.scanning_pattern(prefixes)`` is the regular expression to register.
"""

from __future__ import annotations

from .app import DEFAULT_MAX_BODY, DEFAULT_MAX_TOKENS, SecretScanningApp, secret_scanning_app
from .reports import SCANNING_ACTOR, Finding
from .signatures import GITHUB_KEYS_URL, PublicKeys

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_TOKENS",
    "GITHUB_KEYS_URL",
    "SCANNING_ACTOR",
    "Finding",
    "PublicKeys",
    "SecretScanningApp",
    "secret_scanning_app",
]
