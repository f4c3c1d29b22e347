#!/usr/bin/env python3
"""A lean asyncio+uvloop TCP proxy: the reference for what Python can do per connection.

    uvloop_proxy.py LISTEN_PORT BACKEND_PORT [LISTEN_PORT BACKEND_PORT ...]

Accept, connect, and two Protocols that write what they receive to the other
side, with backpressure (``pause_reading`` while the other side's transport is
over its high-water mark) and half-close (EOF becomes ``write_eof``). No
routing, no hooks, no logs, no idle timeout: the floor a Python proxy on an
event loop stands on, beside HAProxy's in bench/run.py, relay_tiers.py and
conn_cost.py. Everything on 127.0.0.1; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import uvloop

LOOPBACK = "127.0.0.1"


class _Side(asyncio.Protocol):
    """One socket of a pair; ``peer`` is the other side's protocol."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)  # the backend is not connected yet
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if peer.eof:
                # Both directions ended: nothing unread on either side, close both.
                peer.transport.close()
                return False
            peer.transport.write_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, backend: tuple[str, int]) -> None:
        super().__init__()
        self.backend = backend

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _, up = await loop.create_connection(_Side, *self.backend)
        except OSError:
            self.transport.abort()
            return
        up.peer, self.peer = self, up
        assert up.transport is not None
        for data in self.pending:
            up.transport.write(data)
        self.pending.clear()
        if self.eof:
            up.transport.write_eof()
        if self.transport.is_closing():
            up.transport.close()


async def _serve(pairs: list[tuple[int, int]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    servers = []
    for listen, backend in pairs:
        target = (LOOPBACK, backend)
        servers.append(
            await loop.create_server(
                lambda target=target: _Client(target),  # type: ignore[misc]
                LOOPBACK,
                listen,
                backlog=4096,
                reuse_address=True,
            )
        )
        for sock in servers[-1].sockets:
            # Inherited by the accepted sockets (Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    ports = [int(a) for a in argv]
    uvloop.run(_serve(list(zip(ports[::2], ports[1::2], strict=True))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
