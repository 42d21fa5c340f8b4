"""RespClient: the verification memo's Redis client, two commands on one connection.

A memo lookup is on every cache miss of a fleet warming up. redis-py spends about 110 µs
of CPU on a GET (its pool, retries, locks and parser), an eighth of such a miss; this
client spends about 27 µs. It speaks RESP2 over one asyncio connection, pipelined (Redis
answers in the order it was asked), and knows ``GET`` and ``SET … PX``, plus ``AUTH``
and ``SELECT`` when it connects. ``get_soon`` sends a GET without waiting for it, so a
miss asks the memo while it reads the store.

URLs: ``redis://[user:password@]host[:port][/db]``; ``rediss://`` for TLS (the system's
certificate authorities, or ``?ssl_ca_certs=PATH``; ``?ssl_cert_reqs=none`` turns the
check off); ``unix:///path/to/socket[?db=N]``. A command that times out, or a connection
that breaks, closes the connection and raises ``RespError``; the next command connects
again. One client belongs to the event loop that first used it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from functools import partial
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import ConfigurationError

__all__ = ["RespClient", "RespError"]

_CRLF = b"\r\n"
#: The query parameters a URL may carry.
_OPTIONS = frozenset({"db", "ssl_cert_reqs", "ssl_ca_certs"})


class RespError(Exception):
    """Redis refused a command, or could not be reached or understood in time."""


class _Incomplete(Exception):
    """The buffer ends before the reply does."""


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """The reply at ``pos`` of ``buf`` and where the next begins (``_Incomplete`` when
    it has not all arrived). An error reply is returned as a ``RespError``."""
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == 0x24:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 0x2B:  # + simple string
        return line, pos
    if kind == 0x3A:  # : integer
        return int(line), pos
    if kind == 0x2D:  # - error
        return RespError(line.decode("utf-8", "replace")), pos
    if kind == 0x2A:  # * array
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ValueError(f"not a RESP reply: {bytes(buf[pos - len(line) - 3 : pos])!r}")


def _command(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """Replies handed to the commands waiting for them, in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buffer = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        pos = 0
        try:
            while self.waiting and pos < len(self.buffer):
                reply, pos = _parse(self.buffer, pos)
                waiter = self.waiting.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except _Incomplete:
            pass
        except ValueError as exc:
            self.close(RespError(str(exc)))
            return
        del self.buffer[:pos]
        if self.buffer and not self.waiting:
            self.close(RespError("Redis sent a reply nobody asked for"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RespError(f"connection lost: {exc!r}" if exc else "connection closed"))

    def close(self, reason: RespError) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        self._fail(reason)

    def _fail(self, reason: RespError) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(reason)


class RespClient:
    """``await client.get(key)``, ``get_soon(key)``, ``set(key, value, px=ms)`` on
    ``url``, each within ``timeout`` seconds (connecting included)."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        query = dict(parse_qsl(parts.query))
        unknown = sorted(set(query) - _OPTIONS)
        if scheme not in ("redis", "rediss", "unix") or unknown:
            raise ConfigurationError(
                f"a Redis URL is redis://, rediss:// or unix:// with no parameters but "
                f"{', '.join(sorted(_OPTIONS))}; got scheme {scheme!r}, parameters {unknown}"
            )
        path = parts.path.strip("/")
        db = query.get("db") or (path if scheme != "unix" else "") or "0"
        if not db.isdigit():
            raise ConfigurationError(f"a Redis database is a number, not {db!r}")
        self.timeout = timeout
        self._unix_path = parts.path if scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._ssl = _ssl_context(query) if scheme == "rediss" else None
        self._hello: list[bytes] = []
        if parts.password is not None:
            credentials = [unquote(parts.password).encode()]
            if parts.username:
                credentials.insert(0, unquote(parts.username).encode())
            self._hello.append(_command(b"AUTH", *credentials))
        if db != "0":
            self._hello.append(_command(b"SELECT", db.encode()))
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def get(self, key: str) -> bytes | None:
        return await self.value_of(
            self._send(await self._connection(), _command(b"GET", key.encode()))
        )

    def get_soon(self, key: str) -> asyncio.Future[Any] | None:
        """Send ``GET key`` now and return its reply to come, for ``value_of``; ``None``
        when there is no connection yet (``get`` makes one). The caller does other work
        (a store read) while the command is on its way."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return None
        return self._send(protocol, _command(b"GET", key.encode()))

    @staticmethod
    async def value_of(reply: asyncio.Future[Any]) -> bytes | None:
        """The value a reply brings (a ``get_soon``'s, or any command's); an error
        reply raised as ``RespError``."""
        value = await reply
        if isinstance(value, RespError):
            raise value
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, *, px: int) -> None:
        command = _command(b"SET", key.encode(), value, b"PX", str(px).encode())
        await self.value_of(self._send(await self._connection(), command))

    async def aclose(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.lost = True
            protocol.transport.close()

    async def _connection(self) -> _Protocol:
        """The open connection, or a new one within ``timeout``."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            try:
                protocol = await asyncio.wait_for(self._connect(), self.timeout)
            except asyncio.TimeoutError:
                raise RespError(f"cannot connect within {self.timeout} s") from None
        return protocol

    def _expire(self, protocol: _Protocol, waiter: asyncio.Future[Any]) -> None:
        """No answer in time: the connection is closed (its replies would come out of
        order for the next command), failing every command waiting on it."""
        if not waiter.done():
            if self._protocol is protocol:
                self._protocol = None
            protocol.close(RespError(f"no answer within {self.timeout} s"))

    def _send(self, protocol: _Protocol, command: bytes) -> asyncio.Future[Any]:
        """Write ``command``; its reply's future, failed if no reply comes in time."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        timer = loop.call_later(self.timeout, self._expire, protocol, waiter)
        waiter.add_done_callback(partial(_settled, timer))
        protocol.waiting.append(waiter)
        assert protocol.transport is not None
        protocol.transport.write(command)
        return waiter

    async def _connect(self) -> _Protocol:
        """The connection, opened (and greeted: AUTH, SELECT) by the first who needs it."""
        pending = self._connecting
        if pending is not None:
            return await asyncio.shield(pending)
        self._connecting = pending = asyncio.get_running_loop().create_future()
        try:
            protocol = await self._open()
        except BaseException as exc:
            failure = exc if isinstance(exc, RespError) else RespError(repr(exc))
            pending.set_exception(failure)
            pending.exception()  # retrieved: a connect nobody else waited for is no error
            raise
        finally:
            self._connecting = None
        self._protocol = protocol
        pending.set_result(protocol)
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            if self._unix_path is not None:
                _, protocol = await loop.create_unix_connection(_Protocol, self._unix_path)
            else:
                _, protocol = await loop.create_connection(
                    _Protocol, self._host, self._port, ssl=self._ssl
                )
        except OSError as exc:
            raise RespError(f"cannot connect: {type(exc).__name__}") from exc
        for greeting in self._hello:
            reply = await self._send(protocol, greeting)
            if isinstance(reply, RespError):
                protocol.close(reply)
                raise reply
        return protocol


def _settled(timer: asyncio.TimerHandle, waiter: asyncio.Future[Any]) -> None:
    """A reply came (or the command failed): its timer is over, and a failure nobody
    awaits (a ``get_soon`` left unread) is not logged as an unretrieved exception."""
    timer.cancel()
    if not waiter.cancelled():
        waiter.exception()


def _ssl_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
    requirement = query.get("ssl_cert_reqs", "required").lower()
    if requirement == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif requirement == "optional":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_OPTIONAL
    elif requirement != "required":
        raise ConfigurationError(
            f"ssl_cert_reqs is none, optional or required, not {requirement!r}"
        )
    return context
