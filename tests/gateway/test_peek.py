"""gateway/peek.py on real loopback TCP sockets: MSG_PEEK until the parser has
enough, without spinning; timeout, EOF, reset and the cap; consuming queued bytes."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from gateway.linux import SO_RCVLOWAT
from gateway.peek import PeekFailed, peek, recv_exactly_queued

from relay_helpers import topology


@pytest.fixture
async def pair() -> AsyncIterator[tuple[trio.socket.SocketType, socket.socket]]:
    """(the client's end, the gateway's non-blocking accepted end)."""
    with topology() as topo:
        yield topo.client, topo.gw_client


class Counting:
    """A parser that wants ``need`` bytes and counts its calls."""

    def __init__(self, need: int) -> None:
        self.need = need
        self.calls = 0
        self.seen: list[int] = []

    def __call__(self, data: bytes) -> bytes | int:
        self.calls += 1
        self.seen.append(len(data))
        return data[: self.need] if len(data) >= self.need else self.need


def length_prefixed(data: bytes) -> bytes | int:
    """A preamble of a 2-byte length and that many bytes (like a TLS record)."""
    if len(data) < 2:
        return 2
    (n,) = struct.unpack("!H", data[:2])
    return data[2 : 2 + n] if len(data) >= 2 + n else 2 + n


async def test_waits_for_enough_bytes_without_spinning(pair) -> None:
    client, gw = pair
    parse = Counting(10)
    got: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:

            async def run() -> None:
                got.append(await peek(gw, parse, 100, timeout=5))

            n.start_soon(run)
            await client.send(b"abc")
            # While only 3 of 10 bytes are queued the socket stays readable after
            # each peek; SO_RCVLOWAT is what keeps the loop from spinning here.
            await trio.sleep(0.3)
            assert not got
            await client.send(b"defghijklm")
    assert got == [b"abcdefghij"]
    assert parse.calls <= 3, parse.seen
    # Nothing was consumed, and the socket is left as it was found.
    assert gw.recv(100) == b"abcdefghijklm"
    assert gw.getsockopt(socket.SOL_SOCKET, SO_RCVLOWAT) == 1


async def test_need_grows_as_bytes_arrive(pair) -> None:
    """A parser that learns its length from a header, bytes trickling one by one."""
    client, gw = pair
    body = bytes(range(40))
    preamble = struct.pack("!H", len(body)) + body
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            got: list[bytes] = []

            async def run() -> None:
                got.append(await peek(gw, length_prefixed, 100, timeout=5))

            n.start_soon(run)
            for i in range(len(preamble)):
                await client.send(preamble[i : i + 1])
                await trio.sleep(0.005)
            await client.send(b"payload")
    assert got == [body]
    assert recv_exactly_queued(gw, len(preamble)) == preamble
    assert gw.recv(100) == b"payload"


async def test_result_at_once_when_already_queued(pair) -> None:
    client, gw = pair
    await client.send(b"0123456789")
    await trio.sleep(0.05)
    parse = Counting(4)
    with trio.fail_after(5):
        assert await peek(gw, parse, 100, timeout=5) == b"0123"
    assert parse.calls == 1


async def test_timeout_when_the_peer_stalls(pair) -> None:
    client, gw = pair
    await client.send(b"abc")
    with trio.fail_after(5), pytest.raises(PeekFailed, match=r"not complete within 0\.2s"):
        await peek(gw, Counting(10), 100, timeout=0.2)
    assert gw.getsockopt(socket.SOL_SOCKET, SO_RCVLOWAT) == 1
    assert gw.recv(100) == b"abc"


async def test_timeout_when_nothing_arrives(pair) -> None:
    _, gw = pair
    with trio.fail_after(5), pytest.raises(PeekFailed, match="within"):
        await peek(gw, Counting(1), 100, timeout=0.1)


@pytest.mark.parametrize("sent", [b"", b"abc"])
async def test_eof_before_the_preamble_is_complete(pair, sent: bytes) -> None:
    client, gw = pair
    if sent:
        await client.send(sent)
    client.shutdown(socket.SHUT_WR)
    with trio.fail_after(5), pytest.raises(PeekFailed, match="peer closed"):
        await peek(gw, Counting(10), 100, timeout=5)


async def test_eof_while_waiting(pair) -> None:
    client, gw = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            failed: list[PeekFailed] = []

            async def run() -> None:
                with pytest.raises(PeekFailed, match="peer closed") as info:
                    await peek(gw, Counting(10), 100, timeout=5)
                failed.append(info.value)

            n.start_soon(run)
            await client.send(b"abc")
            await trio.sleep(0.1)
            client.shutdown(socket.SHUT_WR)
    assert failed


async def test_reset_by_the_peer(pair) -> None:
    client, gw = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with trio.fail_after(5), pytest.raises(PeekFailed):
        await peek(gw, Counting(10), 100, timeout=5)


async def test_more_than_the_cap_is_refused(pair) -> None:
    client, gw = pair
    await client.send(b"\x10\x00")  # a length of 4096 with a cap of 100
    with trio.fail_after(5), pytest.raises(PeekFailed, match="needs 4098 bytes, more than 100"):
        await peek(gw, length_prefixed, 100, timeout=5)


async def test_at_most_cap_bytes_are_looked_at(pair) -> None:
    client, gw = pair
    await client.send(b"x" * 500)
    await trio.sleep(0.05)
    parse = Counting(50)
    with trio.fail_after(5):
        await peek(gw, parse, 64, timeout=5)
    assert parse.seen == [64]


async def test_a_parser_error_propagates(pair) -> None:
    client, gw = pair

    def bad(data: bytes) -> int:
        raise ValueError("not a preamble")

    await client.send(b"abc")
    with trio.fail_after(5), pytest.raises(ValueError, match="not a preamble"):
        await peek(gw, bad, 100, timeout=5)


async def test_recv_exactly_queued(pair) -> None:
    client, gw = pair
    await client.send(b"HEADERpayload")
    await trio.sleep(0.05)
    assert recv_exactly_queued(gw, 6) == b"HEADER"
    assert gw.recv(100) == b"payload"


async def test_recv_exactly_queued_refuses_a_short_read(pair) -> None:
    client, gw = pair
    await client.send(b"abc")
    await trio.sleep(0.05)
    with pytest.raises(PeekFailed, match="expected 5 queued bytes, got 3"):
        recv_exactly_queued(gw, 5)
