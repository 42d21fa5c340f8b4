"""RespClient (``resp.py``), the memo's Redis client: replies however they arrive, the real
Redis of ``KEYSTILE_TEST_REDIS_URL``, and servers that misbehave."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from keystile import ConfigurationError
from keystile.resp import RespClient, RespError, _Protocol

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- replies, however they are cut ------------------------------------------------------


REPLIES: list[tuple[bytes, Any]] = [
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"+OK\r\n", b"OK"),
    (b":42\r\n", 42),
    (b"*3\r\n$1\r\na\r\n$-1\r\n$2\r\n\r\n\r\n", [b"a", None, b"\r\n"]),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
]


@pytest.mark.parametrize(("wire", "value"), REPLIES)
async def test_a_reply_is_read_whole_however_it_is_cut(wire: bytes, value: Any) -> None:
    loop = asyncio.get_running_loop()
    for cut in range(1, len(wire) + 1):
        protocol = _Protocol()
        waiters = [loop.create_future(), loop.create_future()]
        protocol.waiting.extend(waiters)
        stream = wire + wire
        for start in range(0, len(stream), cut):
            protocol.data_received(stream[start : start + cut])
        assert [w.result() for w in waiters] == [value, value]
        assert not protocol.buffer and not protocol.lost


async def test_an_error_reply_is_a_resp_error_and_the_connection_stays() -> None:
    protocol = _Protocol()
    waiter = asyncio.get_running_loop().create_future()
    protocol.waiting.append(waiter)
    protocol.data_received(b"-WRONGTYPE Operation against a key\r\n")
    assert isinstance(waiter.result(), RespError)
    assert "WRONGTYPE" in str(waiter.result())
    assert not protocol.lost


@pytest.mark.parametrize("wire", [b"!garbage\r\n", b"$abc\r\n", b":1\r\n"])
async def test_garbage_or_a_reply_nobody_asked_for_closes_the_connection(wire: bytes) -> None:
    protocol = _Protocol()
    waiter = asyncio.get_running_loop().create_future()
    if wire != b":1\r\n":
        protocol.waiting.append(waiter)
    protocol.data_received(wire)
    assert protocol.lost
    if wire != b":1\r\n":
        assert isinstance(waiter.exception(), RespError)


# -- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://cache:6379/0",
        "redis://cache:6379/0?socket_timeout=5",
        "redis://cache:6379/two",
        "unix:///run/redis.sock?db=x",
        "rediss://cache:6379/0?ssl_cert_reqs=sometimes",
    ],
)
def test_a_url_it_cannot_honour_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RespClient(url, timeout=1)


def test_rediss_checks_the_certificate_unless_told_not_to() -> None:
    strict = RespClient("rediss://cache:6380/0", timeout=1)._ssl
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED
    assert strict.check_hostname
    lax = RespClient("rediss://cache:6380/0?ssl_cert_reqs=none", timeout=1)._ssl
    assert lax is not None and lax.verify_mode == ssl.CERT_NONE
    assert RespClient("redis://cache:6379/0", timeout=1)._ssl is None


def test_credentials_and_database_are_sent_when_it_connects() -> None:
    client = RespClient("redis://user:p%40ss@cache:6379/3", timeout=1)
    assert client._hello == [
        b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$4\r\np@ss\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n",
    ]
    assert RespClient("redis://:secret@cache:6379", timeout=1)._hello == [
        b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n"
    ]
    assert RespClient("unix:///run/redis.sock?db=2", timeout=1)._hello == [
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n"
    ]


# -- the real Redis -------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"keystile-test-resp-{uuid.uuid4().hex[:10]}"


async def test_get_and_set_with_an_expiry_on_redis(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = RespClient(redis_url.split("?")[0], timeout=2)
    other = aioredis.Redis.from_url(redis_url.split("?")[0])
    try:
        value = bytes(range(256)) + b"\r\n$-1\r\n"
        await client.set(f"{prefix}:a", value, px=60_000)
        assert await client.get(f"{prefix}:a") == value
        assert await client.get(f"{prefix}:missing") is None
        soon = [client.get_soon(f"{prefix}:{name}") for name in ("a", "missing", "a")]
        assert all(reply is not None for reply in soon)
        assert [await RespClient.value_of(r) for r in soon if r is not None] == [
            value,
            None,
            value,
        ]
        assert 0 < await other.pttl(f"{prefix}:a") <= 60_000
        answers = await asyncio.gather(*(client.get(f"{prefix}:a") for _ in range(50)))
        assert answers == [value] * 50
    finally:
        await other.delete(f"{prefix}:a")
        await other.aclose()
        await client.aclose()


async def test_the_database_of_the_url_is_the_one_used(redis_url: str, prefix: str) -> None:
    base = redis_url.split("?")[0].rsplit("/", 1)[0]
    zero, three = RespClient(f"{base}/0", timeout=2), RespClient(f"{base}/3", timeout=2)
    try:
        await three.set(f"{prefix}:db", b"three", px=10_000)
        assert await three.get(f"{prefix}:db") == b"three"
        assert await zero.get(f"{prefix}:db") is None
    finally:
        await three.set(f"{prefix}:db", b"", px=1)
        await zero.aclose()
        await three.aclose()


async def test_a_refused_password_is_a_resp_error(redis_url: str) -> None:
    host = redis_url.split("//", 1)[1].split("/", 1)[0]
    client = RespClient(f"redis://:not-the-password@{host}/0", timeout=2)
    with pytest.raises(RespError):
        await client.get("anything")
    await client.aclose()


# -- servers that misbehave -------------------------------------------------------------


def closing(handler: Handler) -> Handler:
    """``handler``, its connection closed when it is done (or the client hung up)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


@pytest.fixture
async def fake_redis() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(closing(handler), "127.0.0.1", 0)
        servers.append(server)
        return f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"

    yield start
    for server in servers:
        server.close()


async def test_no_answer_in_time_is_a_resp_error_and_the_next_command_reconnects(
    fake_redis: Callable[[Handler], Awaitable[str]],
) -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await reader.readuntil(b"GET\r\n")
        if len(connections) > 1:
            await reader.readline()
            await reader.readline()
            writer.write(b"$2\r\nok\r\n")
            await writer.drain()
        await reader.read()  # the first connection: never answers

    client = RespClient(await fake_redis(handler), timeout=0.2)
    with pytest.raises(RespError, match="no answer"):
        await client.get("k")
    assert await client.get("k") == b"ok"
    assert len(connections) == 2
    await client.aclose()


async def test_a_server_that_hangs_up_fails_the_waiting_commands(
    fake_redis: Callable[[Handler], Awaitable[str]],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"GET\r\n")
        writer.close()

    client = RespClient(await fake_redis(handler), timeout=2)
    with pytest.raises(RespError, match="connection"):
        await client.get("k")
    await client.aclose()


async def test_a_refused_connection_is_a_resp_error(closed_port_url: str) -> None:
    client = RespClient(closed_port_url, timeout=1)
    assert client.get_soon("k") is None  # no connection: nothing sent
    with pytest.raises(RespError, match="cannot connect"):
        await client.get("k")


async def test_a_reply_nobody_reads_fails_quietly(
    fake_redis: Callable[[Handler], Awaitable[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A ``get_soon`` left unread (the miss was refused before it looked) logs nothing
    when its connection fails."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"GET\r\n")
        writer.write(b"$1\r\nx\r\n")
        await writer.drain()
        await reader.readuntil(b"GET\r\n")
        writer.close()

    client = RespClient(await fake_redis(handler), timeout=2)
    assert await client.get("first") == b"x"
    unread = client.get_soon("second")
    assert unread is not None
    with pytest.raises(RespError):
        await client.get("third")
    assert unread.done() and isinstance(unread.exception(), RespError)
    del unread
    import gc

    gc.collect()
    assert "never retrieved" not in caplog.text


async def test_a_unix_socket_is_spoken_to(tmp_path: Path) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line == b"SELECT\r\n":
                await reader.readline()
                await reader.readline()
                writer.write(b"+OK\r\n")
            elif line == b"GET\r\n":
                await reader.readline()
                writer.write(b"$4\r\n" + (await reader.readline())[:4] + b"\r\n")

    path = tmp_path / "redis.sock"
    server = await asyncio.start_unix_server(closing(handler), str(path))
    client = RespClient(f"unix://{path}?db=1", timeout=2)
    try:
        assert await client.get("abcdef") == b"abcd"
    finally:
        await client.aclose()
        server.close()
