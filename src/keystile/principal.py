"""The authenticated principal, in Starlette's own shape (``BaseUser``)."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

from starlette.authentication import BaseUser

from .limits.policy import LimitPolicy
from .stores.records import KeyRecord
from .tokens import redact

__all__ = ["MAX_IP_ALLOWLIST", "APIKeyUser", "IPAllowlist", "normalize_cidrs"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


#: The most networks a key's IP allowlist may hold when it is set.
MAX_IP_ALLOWLIST = 256


def normalize_cidrs(cidrs: Iterable[str], *, strict: bool = False) -> tuple[str, ...]:
    """``cidrs`` as stored: each an IPv4 or IPv6 network (a bare address is a /32 or
    /128), normalised, duplicates dropped; ``ValueError`` naming the first bad one.

    Host bits must be zero (``10.0.0.0/8``, not ``10.1.2.3/8``): an allowlist that
    silently widened what the operator typed would be a worse surprise than an error.

    ``strict`` adds the rules for an allowlist being set (a stored one is read without
    them, so a key stored before them keeps working): at most ``MAX_IP_ALLOWLIST``
    networks; no zone id (``fe80::%eth0/64``), which names an interface of one host and
    would be ignored by the match; no IPv4-mapped network (``::ffff:10.0.0.0/104``),
    since an IPv4-mapped client is matched as its IPv4 address (write ``10.0.0.0/8``)."""
    if isinstance(cidrs, str):
        raise ValueError("an IP allowlist is a list of CIDRs, not one string")
    result: dict[str, None] = {}
    for cidr in cidrs:
        if not isinstance(cidr, str):
            raise ValueError(f"invalid CIDR {cidr!r}: give a string such as '10.0.0.0/8'")
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from None
        if strict:
            _check_settable(cidr, network)
        text = str(network)
        if text not in result:
            if strict and len(result) == MAX_IP_ALLOWLIST:
                raise ValueError(f"an IP allowlist holds at most {MAX_IP_ALLOWLIST} networks")
            result[text] = None
    return tuple(result)


def _check_settable(cidr: str, network: _Network) -> None:
    if not isinstance(network, ipaddress.IPv6Network):
        return
    zone = network.network_address.scope_id
    if zone is not None:
        raise ValueError(
            f"invalid CIDR {cidr!r}: a zone id (%{zone}) names a network interface, which"
            " the allowlist cannot check; give the network without it"
        )
    mapped = _as_ipv4(network)
    if mapped is not None:
        raise ValueError(
            f"invalid CIDR {cidr!r}: an IPv4-mapped network; give the IPv4 network {mapped}"
            " (an IPv4-mapped client address is matched as its IPv4 address)"
        )


def _as_ipv4(network: ipaddress.IPv6Network) -> ipaddress.IPv4Network | None:
    """The IPv4 network an IPv4-mapped one (``::ffff:10.0.0.0/104``) stands for."""
    mapped = network.network_address.ipv4_mapped
    if mapped is None or network.prefixlen < 96:
        return None
    return ipaddress.IPv4Network((mapped, network.prefixlen - 96))


class IPAllowlist:
    """A key's IP allowlist, parsed once when the key is cached, checked on every request.

    ``allows`` remembers its decision per client host (at most ``MEMO_SIZE`` hosts, then
    it starts over), so a client's repeated requests cost one dict lookup; a new host
    costs one ``ipaddress`` parse. The decision depends on the allowlist alone, so one
    instance is safely shared by every request made with the key.

    An IPv4-mapped client address (``::ffff:10.1.2.3``, what a dual-stack server reports
    for an IPv4 client) is checked as the IPv4 address it carries, against the IPv4
    networks only: ``::/0`` admits IPv6 clients, never IPv4 ones. An IPv4-mapped network
    stored before such entries were refused counts as the IPv4 network it stands for.
    """

    __slots__ = ("_seen", "_v4", "_v6", "cidrs")

    MEMO_SIZE = 4096

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.cidrs = normalize_cidrs(cidrs)
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for cidr in self.cidrs:
            network = ipaddress.ip_network(cidr)
            if isinstance(network, ipaddress.IPv4Network):
                v4.append(network)
            elif (mapped := _as_ipv4(network)) is not None:
                v4.append(mapped)
            else:
                v6.append(network)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)
        self._seen: dict[str, bool] = {}

    def allows(self, client: Any) -> bool:
        """Whether ``client`` (ASGI ``scope["client"]``: ``(host, port)`` or ``None``) is
        inside the allowlist. No client, or a host that is not an IP address: refused."""
        if client is None:
            return False
        host = client[0]
        decision = self._seen.get(host) if isinstance(host, str) else False
        if decision is None:
            decision = self._decide(host)
            if len(self._seen) >= self.MEMO_SIZE:
                self._seen.clear()
            self._seen[host] = decision
        return decision

    def _decide(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return any(address in n for n in self._v6)
            address = mapped
        return any(address in n for n in self._v4)

    def __repr__(self) -> str:
        return f"IPAllowlist({list(self.cidrs)!r})"


#: The metadata of every key that has none: one shared read-only mapping, not one each.
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
#: Scope tuples shared between keys with the same scopes (a cache holds many such keys).
_SHARED_SCOPES: dict[tuple[str, ...], tuple[str, ...]] = {}
_SHARED_SCOPES_MAX = 10_000


def _shared_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    value = tuple(scopes)
    shared = _SHARED_SCOPES.get(value)
    if shared is not None:
        return shared
    if len(_SHARED_SCOPES) < _SHARED_SCOPES_MAX:
        _SHARED_SCOPES[value] = value
    return value


def _frozen(value: Any) -> Any:
    """``value`` with every dict made a read-only mapping and every list a tuple."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


class APIKeyUser(BaseUser):
    """The key that authenticated a request: ``request.user`` after ``APIKeyMiddleware``.

    ``display_name`` is ``apikey:<name>`` for audit logs; ``identity`` is the public key
    id. It holds no secret and no hash.

    Immutable, metadata included: one instance serves every request made with the key
    while it is cached, so a handler that could change it would change what later
    requests are granted.
    """

    __slots__ = (
        "expires_at",
        "ip_allowlist",
        "key_id",
        "limits",
        "metadata",
        "name",
        "owner",
        "prefix",
        "scopes",
    )

    def __init__(
        self,
        *,
        key_id: str,
        owner: str,
        name: str,
        scopes: tuple[str, ...] = (),
        metadata: Mapping[str, Any] | None = None,
        prefix: str = "ks",
        expires_at: datetime | None = None,
        limits: LimitPolicy | None = None,
        ip_allowlist: IPAllowlist | Iterable[str] | None = None,
    ) -> None:
        if ip_allowlist is not None and not isinstance(ip_allowlist, IPAllowlist):
            ip_allowlist = IPAllowlist(ip_allowlist)
        init = object.__setattr__
        init(self, "key_id", key_id)
        init(self, "owner", sys.intern(owner))
        init(self, "name", name)
        init(self, "scopes", _shared_scopes(scopes))
        init(self, "metadata", _frozen(dict(metadata)) if metadata else _NO_METADATA)
        init(self, "prefix", prefix)
        init(self, "expires_at", expires_at)
        init(self, "limits", limits)
        init(self, "ip_allowlist", ip_allowlist if ip_allowlist and ip_allowlist.cidrs else None)

    key_id: str
    owner: str
    name: str
    scopes: tuple[str, ...]
    metadata: Mapping[str, Any]
    prefix: str
    expires_at: datetime | None
    #: The key's rate limit and quota, precomputed from its record (``None``: no limit of
    #: its own), so the request path pays one attribute check for an unlimited key.
    limits: LimitPolicy | None
    #: The key's IP allowlist, parsed, or ``None`` (any address): the request path pays
    #: one attribute check for a key without one.
    ip_allowlist: IPAllowlist | None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"APIKeyUser is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"APIKeyUser is immutable: cannot delete {name!r}")

    @classmethod
    def from_record(cls, record: KeyRecord) -> APIKeyUser:
        return cls(
            key_id=record.id,
            owner=record.owner,
            name=record.name,
            scopes=record.scopes,
            metadata=record.metadata,
            prefix=record.prefix,
            expires_at=record.expires_at,
            limits=LimitPolicy.from_record(record),
            ip_allowlist=IPAllowlist(record.ip_allowlist) if record.ip_allowlist else None,
        )

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return f"apikey:{self.name}"

    @property
    def identity(self) -> str:
        return self.key_id

    @property
    def redacted(self) -> str:
        return redact(self.key_id, self.prefix)

    def has_scopes(self, *scopes: str) -> bool:
        """Whether the key holds every one of ``scopes``; "authenticated" is held by every
        key, as in ``request.auth.scopes``."""
        return all(scope == "authenticated" or scope in self.scopes for scope in scopes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, APIKeyUser):
            return NotImplemented
        return (self.key_id, self.owner, self.name, self.scopes) == (
            other.key_id,
            other.owner,
            other.name,
            other.scopes,
        )

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return (
            f"APIKeyUser(key_id={self.key_id!r}, owner={self.owner!r}, name={self.name!r}, "
            f"scopes={self.scopes!r})"
        )
