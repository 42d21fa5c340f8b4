"""Where a webhook may point (against SSRF): ``https://`` (``http://`` only to loopback),
and never a private, loopback, link-local or otherwise non-public address unless
``allow_private_networks=True``. Checked when a webhook is added (its URL) and before
every delivery (what its host resolves to then, so a name that later resolves inside
the network is refused too).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import anyio

from ..errors import KeyManagementError

__all__ = ["check_url", "checked_addresses", "is_public"]

MAX_URL_LENGTH = 2048


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_url(url: str, *, allow_private_networks: bool = False) -> str:
    """``url`` if a webhook may point there; else ``KeyManagementError`` saying why."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise KeyManagementError(f"a webhook URL is 1-{MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise KeyManagementError(f"not a URL: {url!r}") from None
    if not host or parts.username or parts.password:
        raise KeyManagementError("a webhook URL needs a host and no user or password")
    if parts.scheme not in ("https", "http"):
        raise KeyManagementError("a webhook URL is https:// (or http:// to loopback)")
    if parts.scheme == "http" and not _is_loopback(host):
        raise KeyManagementError("a webhook URL must be https:// unless it is on loopback")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    private = (literal is not None and not is_public(host)) or _is_loopback(host)
    if private and not allow_private_networks:
        raise KeyManagementError(
            f"a webhook may not point to a private or loopback address ({host}) unless"
            " allow_private_networks=True"
        )
    return url


async def checked_addresses(url: str, *, allow_private_networks: bool) -> None:
    """Raise ``OSError`` if ``url``'s host resolves to an address it may not reach."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if allow_private_networks:
        return
    for info in infos:
        address = str(info[4][0])
        if not is_public(address):
            raise OSError(f"{host} resolves to a non-public address ({address})")
