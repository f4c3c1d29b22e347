"""Real backends and clients for end-to-end tests (trio, loopback or a netns).

The scripted exchange: the client's first 17 bytes say what the backend must
do (reply size, seed, mode); the rest is the client's payload. Both payloads
are non-repeating (relay_helpers.payload), and each side records SHA-256 and
length of what it received, so a dropped, duplicated or reordered byte
anywhere on the path fails the comparison.

Modes:
    CONCURRENT   the backend sends its reply while it reads.
    AFTER_EOF    the backend replies only after the client's EOF (the client
                 half-closed and must still receive everything).
    FIRST        the backend sends its reply and half-closes at once; the
                 client sends its payload only after it has read that EOF.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from relay_helpers import payload

HEADER = struct.Struct("!QQB")
CONCURRENT, AFTER_EOF, FIRST = 0, 1, 2


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


async def recv_all(stream: trio.SocketStream, limit: int = 1 << 31) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


async def recv_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@dataclass
class ScriptedBackend:
    """Serves the scripted exchange; ``received[seed]`` = digest of the client payload."""

    name: str = "backend"
    received: dict[int, tuple[int, str]] = field(default_factory=dict)
    peers: list[tuple[str, int]] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        peer = stream.socket.getpeername()
        self.peers.append((peer[0], peer[1]))
        async with stream:
            try:
                size, seed, mode = HEADER.unpack(await recv_exactly(stream, HEADER.size))
            except (EOFError, trio.BrokenResourceError):
                return
            reply = payload(size, seed + 1)

            async def send_reply() -> None:
                await stream.send_all(reply)
                await stream.send_eof()

            try:
                if mode == FIRST:
                    await send_reply()
                    self.received[seed] = digest(await recv_all(stream))
                elif mode == AFTER_EOF:
                    self.received[seed] = digest(await recv_all(stream))
                    await send_reply()
                else:
                    async with trio.open_nursery() as n:
                        n.start_soon(send_reply)
                        self.received[seed] = digest(await recv_all(stream))
                # Wait for the client to close, so the close is never ours first.
                with trio.move_on_after(10):
                    await stream.receive_some(1)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                # except*: in CONCURRENT mode a reset reaches us from the nursery,
                # wrapped in an exception group.
                pass

    async def run(self, host: str = "127.0.0.1", port: int = 0, *,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.serve, listeners)


async def scripted_exchange(host: str, port: int, send: int, reply: int, seed: int,
                            mode: int = CONCURRENT) -> tuple[tuple[int, str], bytes]:
    """Run one scripted exchange; returns (digest of what the client sent, reply received)."""
    stream = await trio.open_tcp_stream(host, port)
    return await exchange_on(stream, send, reply, seed, mode)


async def exchange_on(stream: trio.SocketStream, send: int, reply: int, seed: int,
                      mode: int = CONCURRENT) -> tuple[tuple[int, str], bytes]:
    """:func:`scripted_exchange` over a stream already connected (e.g. from a
    namespace, netns.tcp_connect); closes it."""
    mine = payload(send, seed)
    async with stream:
        await stream.send_all(HEADER.pack(reply, seed, mode))
        if mode == FIRST:
            got = await recv_all(stream)
            await stream.send_all(mine)
            await stream.send_eof()
        else:
            got_box: list[bytes] = []

            async def receive() -> None:
                got_box.append(await recv_all(stream))

            async with trio.open_nursery() as n:
                n.start_soon(receive)
                await stream.send_all(mine)
                await stream.send_eof()
            got = got_box[0]
    return digest(mine), got


async def check_exchange(backend: ScriptedBackend, seed: int, sent: tuple[int, str], got: bytes,
                         reply: int) -> None:
    """Both directions intact: the reply as generated, the backend's digest as sent.

    The client can finish before the backend has read its last bytes (they
    sit in socket buffers), so the backend's record is awaited, not polled once.
    """
    want = payload(reply, seed + 1)
    assert len(got) == len(want), f"seed {seed}: reply length {len(got)} != {len(want)}"
    assert got == want, f"seed {seed}: reply bytes differ"
    with trio.move_on_after(20):
        while seed not in backend.received:
            await trio.sleep(0.01)
    assert backend.received.get(seed) == sent, (
        f"seed {seed}: backend got {backend.received.get(seed)} want {sent}"
    )


async def echo_server(host: str = "127.0.0.1", port: int = 0, *, tag: bytes = b"",
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Echo every connection back, then its EOF; first send ``tag`` if there is one."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if tag:
                    await stream.send_all(tag)
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


# --- backends that fail at connect time, on loopback and deterministically ----------


@contextlib.contextmanager
def stalled_listener(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A blocking listener whose accept queue is full: the kernel drops every new
    SYN (LISTENOVERFLOWS), so a connect to it neither succeeds nor is refused; the
    client retransmits its SYN after the initial RTO (1 s). Accepting the one queued
    connection (:func:`reset_next_handshake` does) lets the next SYN through."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsn = socket.socket(family, socket.SOCK_STREAM)
    filler: socket.socket | None = None
    try:
        lsn.bind((host, 0))
        lsn.listen(0)  # a queue of one
        lsn.settimeout(5)
        filler = socket.create_connection(lsn.getsockname()[:2], timeout=5)
        yield lsn
    finally:
        if filler is not None:
            filler.close()
        lsn.close()


def reset_next_handshake(stalled: socket.socket) -> None:
    """Make the connect now waiting on ``stalled`` fail with a reset right after its
    handshake (ECONNRESET from ``SO_ERROR``, not ECONNREFUSED).

    Call it from the trio thread once the connecting task waits (e.g. after
    ``trio.testing.wait_all_tasks_blocked()``). It blocks that thread on purpose:
    the retransmitted SYN completes the handshake, and the backend accepts and
    resets it before the connecting task can run again and look at its socket.
    """
    queued, _ = stalled.accept()
    queued.close()
    backend, _ = stalled.accept()
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    backend.close()


async def tagged_echo_server(tag: bytes, host: str = "127.0.0.1", port: int = 0, *,
                             task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """An echo server that first sends ``tag``: a client knows which backend it reached."""
    await echo_server(host, port, tag=tag, task_status=task_status)
