"""Loopback client → gateway → backend topologies and payload helpers for relay tests.

Payloads are sequence-numbered 64-bit counters offset by a per-stream seed, so a
duplicated, dropped or reordered sub-range can never compare equal (sockmap.md rule 20).
Large transfers stream the same bytes block by block (``send_payload``) and check them
as they arrive (``PayloadCheck``), so a GiB-sized test holds no copy of its payload.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio

from gateway.relay import copy, poller

_LINGER_ABORT = struct.pack("ii", 1, 0)


def payload(n: int, seed: int) -> bytes:
    """Non-repeating bytes: 64-bit counters starting at ``seed << 40``."""
    words = (n + 7) // 8
    base = seed << 40
    return array("Q", range(base, base + words)).tobytes()[:n]


# A block holds 2**16 counters: within one, the counter's low 16 bits (bytes 0-1, little
# endian) count up and bytes 2-7 are constant, because seed << 40 is a multiple of 2**16.
# So a block is a fixed template with six constant byte columns laid over it, which
# costs microseconds where array(range(...)) would cost milliseconds per block.
_BLOCK_WORDS = 1 << 16
PAYLOAD_BLOCK = _BLOCK_WORDS * 8
_LOW_TEMPLATE = array("Q", range(_BLOCK_WORDS)).tobytes()


def payload_block(seed: int, index: int) -> bytes:
    """Bytes ``[index * PAYLOAD_BLOCK, (index + 1) * PAYLOAD_BLOCK)`` of the payload of
    ``seed``: the same bytes ``payload(n, seed)`` has there."""
    high = (seed << 24) + index  # counter bits 16..63 of every word in this block
    assert high < 1 << 48, "seed too large for payload_block"
    buf = bytearray(_LOW_TEMPLATE)
    for byte in range(6):
        value = (high >> (8 * byte)) & 0xFF
        if value:
            buf[2 + byte :: 8] = bytes((value,)) * _BLOCK_WORDS
    return bytes(buf)


def payload_slice(seed: int, start: int, n: int) -> bytes:
    """Bytes ``[start, start + n)`` of the (unbounded) payload stream of ``seed``."""
    out = bytearray()
    index, skip = divmod(start, PAYLOAD_BLOCK)
    while len(out) < n:
        block = payload_block(seed, index)
        out += block[skip : skip + n - len(out)]
        index, skip = index + 1, 0
    return bytes(out)


class PayloadCheck:
    """Checks a received stream against the payload of ``seed`` as it arrives.

    Byte-exact: every piece is compared with the expected bytes at its offset, and
    ``verdict(n)`` also requires the total length to be ``n``. After the first
    difference only the length is counted.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.received = 0
        self.mismatch: int | None = None  # offset of the first differing byte
        self._index = -1
        self._block = b""

    def _expected(self, offset: int, n: int) -> bytes:
        index, skip = divmod(offset, PAYLOAD_BLOCK)
        if index != self._index:
            self._index, self._block = index, payload_block(self.seed, index)
        return self._block[skip : skip + n]

    def feed(self, data: bytes) -> None:
        """Account for the next received piece."""
        pos = 0
        while self.mismatch is None and pos < len(data):
            want = self._expected(self.received + pos, len(data) - pos)
            got = data[pos : pos + len(want)]
            if got != want:
                j = next(i for i in range(len(want)) if got[i] != want[i])
                self.mismatch = self.received + pos + j
            pos += len(want)
        self.received += len(data)

    def verdict(self, n: int) -> str:
        """``"equal"`` if exactly the first ``n`` bytes of the payload arrived, else why not."""
        if self.mismatch is not None:
            return f"first mismatch at {self.mismatch}, len got={self.received} want={n}"
        if self.received != n:
            return f"prefix equal, len got={self.received} want={n}"
        return "equal"


def first_mismatch(got: bytes, want: bytes) -> str:
    """Describe the first difference, for assertion messages."""
    if got == want:
        return "equal"
    n = min(len(got), len(want))
    for i in range(0, n, 1 << 16):
        if got[i : i + (1 << 16)] != want[i : i + (1 << 16)]:
            for j in range(i, min(i + (1 << 16), n)):
                if got[j] != want[j]:
                    return f"first mismatch at {j}, len got={len(got)} want={len(want)}"
    return f"prefix equal, len got={len(got)} want={len(want)}"


@dataclass
class Topology:
    """One flow: the test's client and backend ends, and the gateway's two sockets."""

    client: trio.socket.SocketType
    backend: trio.socket.SocketType
    gw_client: socket.socket
    gw_upstream: socket.socket

    def close_gateway(self, abort: bool = False) -> None:
        for s in (self.gw_client, self.gw_upstream):
            if abort:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
            s.close()

    def close_all(self) -> None:
        for s in (self.gw_client, self.gw_upstream):
            s.close()
        self.client.close()
        self.backend.close()


def _pair(
    rcvbuf: int | None = None, sndbuf: int | None = None
) -> tuple[socket.socket, socket.socket]:
    """A connected (connector, acceptor) loopback TCP pair; buffers set on the acceptor."""
    lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            lsn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            lsn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        con = socket.create_connection(lsn.getsockname())
        acc, _ = lsn.accept()
    finally:
        lsn.close()
    return con, acc


def make_topology(
    *,
    backend_rcvbuf: int | None = None,
    backend_sndbuf: int | None = None,
    client_rcvbuf: int | None = None,
) -> Topology:
    """Build client ↔ gw_client and gw_upstream ↔ backend over loopback."""
    client, gw_client = _pair()
    gw_upstream, backend = _pair(rcvbuf=backend_rcvbuf, sndbuf=backend_sndbuf)
    if client_rcvbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
    for s in (client, gw_client, gw_upstream, backend):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    gw_client.setblocking(False)
    gw_upstream.setblocking(False)
    return Topology(
        client=trio.socket.from_stdlib_socket(client),
        backend=trio.socket.from_stdlib_socket(backend),
        gw_client=gw_client,
        gw_upstream=gw_upstream,
    )


@contextlib.contextmanager
def topology(**kw: int | None) -> Iterator[Topology]:
    topo = make_topology(**kw)
    try:
        yield topo
    finally:
        for s in (topo.client, topo.backend):
            s.close()
        for g in (topo.gw_client, topo.gw_upstream):
            if g.fileno() != -1:
                g.close()


async def send_all(
    sock: trio.socket.SocketType, data: bytes, *, chunk: int = 1 << 20, delay: float = 0.0
) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view[:chunk])
        view = view[n:]
        if delay:
            await trio.sleep(delay)


async def send_payload(
    sock: trio.socket.SocketType,
    seed: int,
    n: int | None = None,
    *,
    until: Callable[[], bool] | None = None,
    chunk: int = PAYLOAD_BLOCK,
    delay: float = 0.0,
    shut: bool = True,
) -> int:
    """Stream the payload of ``seed`` without holding it: exactly ``n`` bytes, or (with
    ``n=None``) chunk after chunk until ``until()`` is true. Then ``SHUT_WR`` unless
    ``shut`` is false.

    Args:
        sock: A connected stream socket.
        seed: The payload's seed.
        n: Bytes to send; None to send until ``until()``.
        until: Checked before each chunk when ``n`` is None.
        chunk: Bytes per burst (at most ``PAYLOAD_BLOCK``).
        delay: Seconds to sleep after each chunk (a slower, burstier sender).
        shut: Whether to shut the write side afterwards.

    Returns:
        The number of bytes sent.
    """
    assert (n is None) != (until is None), "give exactly one of n and until"
    assert 0 < chunk <= PAYLOAD_BLOCK
    sent = 0
    index, block = -1, memoryview(b"")
    while n is None or sent < n:
        if until is not None and until():
            break
        if sent // PAYLOAD_BLOCK != index:
            index = sent // PAYLOAD_BLOCK
            block = memoryview(payload_block(seed, index))
        skip = sent - index * PAYLOAD_BLOCK
        end = skip + chunk if n is None else min(skip + chunk, skip + n - sent)
        view = block[skip:end]
        while view:
            k = await sock.send(view)
            view = view[k:]
            sent += k
        if delay:
            await trio.sleep(delay)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return sent


async def recv_payload(
    sock: trio.socket.SocketType, seed: int, *, chunk: int = 1 << 20, delay: float = 0.0
) -> PayloadCheck:
    """Read to EOF, checking the stream on the fly against the payload of ``seed``.

    Args:
        sock: A connected stream socket.
        seed: The payload's seed.
        chunk: Largest read.
        delay: Seconds to sleep after each read (a slow reader).

    Returns:
        The check; ``verdict(n)`` says whether exactly ``n`` bytes arrived intact.
    """
    check = PayloadCheck(seed)
    while True:
        data = await sock.recv(chunk)
        if not data:
            return check
        check.feed(data)
        if delay:
            await trio.sleep(delay)


async def recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def recv_to_eof(
    sock: trio.socket.SocketType, *, chunk: int = 1 << 20, delay: float = 0.0
) -> bytes:
    buf = bytearray()
    while True:
        data = await sock.recv(chunk)
        if not data:
            return bytes(buf)
        buf += data
        if delay:
            await trio.sleep(delay)


async def expect_reset(sock: trio.socket.SocketType, *, sending: bool = False) -> None:
    """Read (or write) until the socket reports a reset; a clean EOF fails the test."""
    filler = b"x" * 4096
    while True:
        try:
            if sending:
                await sock.send(filler)
                continue
            data = await sock.recv(1 << 20)
        except OSError as exc:
            assert exc.errno in (errno.ECONNRESET, errno.EPIPE), exc
            return
        if not data:
            raise AssertionError("clean EOF where a reset was expected")


def abort(sock: trio.socket.SocketType) -> None:
    """Close with an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


async def exchange(topo: Topology, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    """Client sends ``up`` and backend ``down``, each then half-closes and reads to EOF:
    (what the backend got, what the client got)."""
    got: dict[str, bytes] = {}

    async def client() -> None:
        await send_all(topo.client, up)
        topo.client.shutdown(trio.socket.SHUT_WR)
        got["client"] = await recv_to_eof(topo.client)

    async def backend() -> None:
        await send_all(topo.backend, down)
        topo.backend.shutdown(trio.socket.SHUT_WR)
        got["backend"] = await recv_to_eof(topo.backend)

    async with trio.open_nursery() as n:
        n.start_soon(client)
        n.start_soon(backend)
    return got["backend"], got["client"]


@pytest.fixture(params=[True, False], ids=["in-trios-set", "own-set"])
def poller_set(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a relay test with the relays' sockets in trio's own epoll set, and again with
    the poller's set of its own (gateway/relay/poller.py rule 4: where trio's loop is
    not the one the poller knows). ``pytestmark = pytest.mark.usefixtures("poller_set")``
    runs a whole module both ways."""
    monkeypatch.setattr(poller, "MERGE", request.param)
    return bool(request.param)


def require_compiled_copy_step() -> None:
    """Where gateway/relay/_copystep.c is not built: fail under CI (the install builds
    it, so its absence is a broken install there), skip elsewhere (also a module)."""
    if copy.COMPILED:
        return
    why = f"the compiled copy loop is missing: {copy.STEP_WHY_NOT}"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(params=[True, False], ids=["compiled", "python"])
def copy_step(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a copy-relay test with the compiled loop and delivery
    (gateway/relay/_copystep.c: a pair's events served without Python), and again with
    the Python ones (gateway/relay/copy.py rules 7 and 8, poller.py rule 6)."""
    if request.param:
        require_compiled_copy_step()
    monkeypatch.setattr(copy, "COMPILED", request.param)
    monkeypatch.setattr(poller, "COMPILED", request.param)
    return bool(request.param)
