"""Loopback client → gateway → backend topologies and payload helpers for relay tests.

Payloads are sequence-numbered 64-bit counters offset by a per-stream seed, so a
duplicated, dropped or reordered sub-range can never compare equal (sockmap.md rule 20).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

import trio

_LINGER_ABORT = struct.pack("ii", 1, 0)


def payload(n: int, seed: int) -> bytes:
    """Non-repeating bytes: 64-bit counters starting at ``seed << 40``."""
    words = (n + 7) // 8
    base = seed << 40
    return array("Q", range(base, base + words)).tobytes()[:n]


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
