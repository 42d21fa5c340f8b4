"""GitHub's signature on a secret-scanning report: ECDSA P-256 with SHA-256 over the raw
body, base64 DER in ``Github-Public-Key-Signature``, made with the key that
``Github-Public-Key-Identifier`` names.

The public keys are given (``public_keys={id: pem}``, for offline use and tests) or read
from GitHub's public-keys document, cached, and read again when a report names a key id
the cache does not hold (GitHub has rotated its key), at most once per
``refetch_interval`` so that reports naming random ids cannot make the endpoint fetch
without end. The document's URL comes from configuration only, never from a request.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import anyio

from ..errors import ConfigurationError, ReportRefused

__all__ = ["GITHUB_KEYS_URL", "PublicKeys"]

#: Where GitHub publishes the keys it signs secret-scanning reports with.
GITHUB_KEYS_URL = "https://api.github.com/meta/public_keys/secret_scanning"
#: A key identifier or signature header longer than this is not GitHub's.
MAX_HEADER_LENGTH = 512
#: The public-keys document is small; a larger answer is not read.
MAX_KEYS_DOCUMENT = 256 * 1024


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "the secret-scanning endpoint needs the cryptography package:"
            " pip install 'keystile[scanning]'"
        ) from None
    return serialization


def load_p256_key(pem: str | bytes) -> Any:
    """A P-256 public key from PEM; ``ValueError`` for anything else."""
    from cryptography.hazmat.primitives.asymmetric import ec

    data = pem.encode("ascii") if isinstance(pem, str) else pem
    key = _crypto().load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


def _checked_url(url: str) -> str:
    """https, or http to a loopback address (a test's or a local mirror's)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if (parts.scheme == "https" and host) or (parts.scheme == "http" and loopback):
        return url
    raise ConfigurationError(
        f"keys_url must be an https:// URL (http:// only on loopback): {url!r}"
    )


class PublicKeys:
    """The keys a report may be signed with, by identifier."""

    def __init__(
        self,
        public_keys: Mapping[str, str | bytes] | None = None,
        *,
        keys_url: str | None = GITHUB_KEYS_URL,
        refetch_interval: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        self._keys: dict[str, Any] = {}
        for key_id, pem in (public_keys or {}).items():
            try:
                self._keys[key_id] = load_p256_key(pem)
            except ValueError as exc:
                raise ConfigurationError(f"public key {key_id!r}: {exc}") from None
        # Given keys are the whole set: nothing is fetched unless a URL is given too.
        self.keys_url = (
            None if public_keys is not None and keys_url == GITHUB_KEYS_URL else keys_url
        )
        if self.keys_url is not None:
            _checked_url(self.keys_url)
            _crypto()
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self._fetched_at: float | None = None
        self._lock = anyio.Lock()
        #: How many times the document was read (for operators and tests).
        self.fetches = 0

    async def verify(self, body: bytes, key_id: str | None, signature: str | None) -> None:
        """Return if ``signature`` is the named key's over ``body``; else ``ReportRefused``."""
        if not key_id or not signature:
            raise ReportRefused(
                "missing_signature",
                401,
                "the Github-Public-Key-Identifier and Github-Public-Key-Signature headers"
                " are required",
            )
        if len(key_id) > MAX_HEADER_LENGTH or len(signature) > MAX_HEADER_LENGTH:
            raise ReportRefused("bad_signature", 401, "the signature headers are too long")
        try:
            der = base64.b64decode(signature.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ReportRefused("bad_signature", 401, "the signature is not base64") from None
        key = await self._key(key_id)
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key.verify(der, body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise ReportRefused(
                "bad_signature", 401, "the signature does not match the body"
            ) from None

    async def _key(self, key_id: str) -> Any:
        key = self._keys.get(key_id)
        if key is None and self.keys_url is not None:
            async with self._lock:
                key = self._keys.get(key_id)
                if key is None and self._may_fetch():
                    await self._fetch()
                    key = self._keys.get(key_id)
        if key is None:
            raise ReportRefused("unknown_key_id", 401, "the signing key is not one of GitHub's")
        return key

    def _may_fetch(self) -> bool:
        last = self._fetched_at
        return last is None or time.monotonic() - last >= self.refetch_interval

    async def _fetch(self) -> None:
        assert self.keys_url is not None
        self._fetched_at = time.monotonic()
        self.fetches += 1
        try:
            document = await self._download(self.keys_url)
            entries = json.loads(document)["public_keys"]
            fetched = {}
            for entry in entries:
                try:
                    fetched[str(entry["key_identifier"])] = load_p256_key(str(entry["key"]))
                except (KeyError, TypeError, ValueError):
                    continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReportRefused(
                "keys_unavailable",
                503,
                f"GitHub's public keys could not be read ({type(exc).__name__})",
            ) from None
        self._keys.update(fetched)

    async def _download(self, url: str) -> bytes:
        try:
            import httpx
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ConfigurationError(
                "fetching GitHub's public keys needs httpx: pip install 'keystile[scanning]'"
            ) from None
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
                client.stream("GET", url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise OSError(f"status {response.status_code}")
                chunks = bytearray()
                async for chunk in response.aiter_bytes():
                    chunks += chunk
                    if len(chunks) > MAX_KEYS_DOCUMENT:
                        raise OSError("document too large")
                return bytes(chunks)
        except httpx.HTTPError as exc:
            raise OSError(str(exc)) from None
