#!/usr/bin/env python3
"""Trio reference proxies: what the gateway's core costs per connection without l4gw.

    trio_proxy.py {naive|lean} LISTEN_PORT BACKEND_PORT [LISTEN_PORT BACKEND_PORT ...]

* ``naive``: the textbook trio proxy: ``trio.serve_tcp``, a nursery and two tasks
  per connection copying with ``recv``/``send_all`` (the "naive trio proxy" of the
  project brief).
* ``lean``: the same machinery the gateway uses for a connection (its accept loop
  pattern, one task per connection, :func:`gateway.upstream.connect` and the copy
  relay with the per-process poller, :class:`gateway.relay.copy.CopyRelay`), with
  nothing else: no Flow, no hooks, no plugins, no records. The gateway's CPU per
  connection minus this one's is what l4gw's own layers cost; this one minus the
  uvloop proxy's (bench/uvloop_proxy.py) is what trio costs.

Everything on 127.0.0.1; SIGTERM stops it.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import Endpoint
from gateway.relay.copy import CopyRelay
from gateway.relay.poller import current as current_poller
from gateway.relay.stats import RelayStats
from gateway.upstream import ConnectFailed, connect

LOOPBACK = "127.0.0.1"
CHUNK = 65536


async def naive(listen: int, backend: int) -> None:
    async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
            await dst.send_eof()
        except trio.BrokenResourceError:
            pass

    async def handle(client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(LOOPBACK, backend)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)

    await trio.serve_tcp(handle, listen, host=LOOPBACK)


async def lean(listen: int, backend: int) -> None:
    relay = CopyRelay(CHUNK)
    current_poller()  # the relay's epoll set, made at start as the gateway does
    endpoint = Endpoint(LOOPBACK, backend)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by each accept
    lsock.bind((LOOPBACK, listen))
    lsock.listen(4096)

    async def handle(conn: socket.socket) -> None:
        try:
            up = await connect(endpoint, 5.0)
        except ConnectFailed:
            conn.close()
            return
        try:
            await relay.run(conn, up, RelayStats(), 300.0)
        finally:
            up.close()
            conn.close()

    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            conn.setblocking(False)
            nursery.start_soon(handle, conn)


async def main(kind: str, pairs: list[tuple[int, int]]) -> None:
    serve = naive if kind == "naive" else lean
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for listen, backend in pairs:
                nursery.start_soon(serve, listen, backend)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in ("naive", "lean") or len(sys.argv) % 2:
        sys.exit(__doc__)
    ports = [int(p) for p in sys.argv[2:]]
    trio.run(main, sys.argv[1], list(zip(ports[::2], ports[1::2], strict=True)))
