"""GitHub's side of a secret-scanning report, as the tests play it: a P-256 key pair made
by the test, and reports signed with it the way GitHub signs them."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


@dataclass
class SigningKey:
    identifier: str
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, identifier: str) -> SigningKey:
        return cls(identifier, ec.generate_private_key(ec.SECP256R1()))

    @property
    def pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def sign(self, body: bytes) -> str:
        return base64.b64encode(self.private.sign(body, ec.ECDSA(hashes.SHA256()))).decode()

    def headers(self, body: bytes) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Github-Public-Key-Identifier": self.identifier,
            "Github-Public-Key-Signature": self.sign(body),
        }


def report(*tokens: str, type: str = "keystile_api_key", **fields: str) -> bytes:
    items: list[dict[str, Any]] = [
        {
            "token": token,
            "type": type,
            "url": fields.get("url", "https://github.com/octo/repo/blob/abc/.env"),
            "source": fields.get("source", "content"),
        }
        for token in tokens
    ]
    return json.dumps(items).encode()


def keys_document(*keys: SigningKey) -> dict[str, Any]:
    """GitHub's public-keys document listing ``keys``."""
    return {
        "public_keys": [
            {"key_identifier": k.identifier, "key": k.pem, "is_current": True} for k in keys
        ]
    }


async def post(app: Any, body: bytes, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/", content=body, headers=headers)
