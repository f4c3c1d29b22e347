"""The splice(2) relay tier: payload moves socket → pipe → socket inside the kernel.

One pipe per direction; each direction is one trio task that alternates
``splice(src, pipe)`` and ``splice(pipe, dst)`` on non-blocking fds and sleeps in
``trio.lowlevel.wait_readable``/``wait_writable`` when neither moves a byte.

Rules kept (reference/sockmap.md §6 and rule 19):

1. **Backpressure is the pipe.** A direction reads from its source only while its
   pipe has room and waits for the destination to become writable while the pipe
   holds bytes, so a slow reader closes the sender's TCP window and memory per flow
   is bounded by two pipes plus the socket buffers.
2. **SPLICE_F_MORE only when more data is known to follow** (the read filled the
   pipe's free space and ``FIONREAD`` on the source is still non-zero): ``MSG_MORE``
   corks a partial segment with no timer, and a request/response flow would stall.
3. **Half-close after the drain.** EOF from one side becomes ``shutdown(SHUT_WR)`` on
   the other only once that direction's pipe is empty; the other direction keeps
   flowing until its own EOF.
4. **A reset is never turned into a clean FIN.** An error on either side
   (``ECONNRESET``, ``EPIPE``, ...) sets ``SO_LINGER{1,0}`` on the other socket, so
   the caller's ``close()`` sends an RST; bytes that were in flight are then known
   to the peer as lost rather than silently truncated. An idle timeout that cuts
   the flow while bytes are on the way (in a pipe, or received and not spliced
   yet) sets it on both sockets, for the same reason.
5. **Never busy-loop, stay fair.** ``EAGAIN`` always leads to a wait on the fd; a
   direction that keeps making progress still checkpoints every
   ``_CHUNKS_PER_CHECKPOINT`` chunks so one bulk flow cannot starve the loop.
6. **The caller owns the sockets.** Nothing here closes them; while the relay runs
   no other task may wait on their fds (trio allows one waiter per fd and direction).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

import trio

from gateway.linux import SIOCINQ, ioctl_int
from gateway.relay.stats import RelayStats

__all__ = ["CLOSE_REASONS", "splice_relay", "splice_self_test"]

CLOSE_REASONS: Final = frozenset(
    {"client_eof", "backend_eof", "client_reset", "backend_reset", "idle_timeout"}
)

# fcntl.h via linux/fcntl.h: F_SETPIPE_SZ = 1031, F_GETPIPE_SZ = 1032 (Python has both).
_F_SETPIPE_SZ: Final = fcntl.F_SETPIPE_SZ
_F_GETPIPE_SZ: Final = fcntl.F_GETPIPE_SZ

# 1 MiB is the default /proc/sys/fs/pipe-max-size: large enough that one
# splice pair moves a whole GRO batch, and the unprivileged ceiling anyway.
PIPE_SIZE: Final = 1 << 20
_CHUNKS_PER_CHECKPOINT: Final = 16
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Errors that mean "this side is gone", as opposed to bugs in our use of the API.
_PEER_GONE: Final = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)

_LINGER_ABORT: Final = struct.pack("ii", 1, 0)


def abort_on_close(sock: socket.socket) -> None:
    """Make the next ``close()`` of ``sock`` send an RST (``SO_LINGER{1,0}``).

    Args:
        sock: The socket whose peer must learn that the flow was cut.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        # Already closed or reset: the peer has its answer.
        pass


class _Pipe:
    """One pipe, its two fds and its capacity in bytes."""

    __slots__ = ("capacity", "rfd", "wfd")

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.wfd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # EPERM above pipe-max-size or the per-user pipe quota: the default
            # 64 KiB pipe still works, only with more syscalls per MiB.
            pass
        self.capacity: int = fcntl.fcntl(self.wfd, _F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class _Flow:
    """State shared by the two directions and the idle watchdog of one flow."""

    __slots__ = ("cancel_scope", "first_eof", "last_activity", "reason")

    def __init__(self, cancel_scope: trio.CancelScope) -> None:
        self.cancel_scope = cancel_scope
        self.first_eof: str | None = None
        self.last_activity: float = trio.current_time()
        self.reason: str | None = None

    def touch(self) -> None:
        self.last_activity = trio.current_time()

    def end(self, reason: str) -> None:
        """Record a terminal reason (the first one wins) and stop both directions."""
        if self.reason is None:
            self.reason = reason
        self.cancel_scope.cancel()


def _in_flight(client: socket.socket, upstream: socket.socket, pipes: list[_Pipe]) -> bool:
    """Whether bytes are between the two peers: in a pipe, or unread on a socket."""
    try:
        fds = [client.fileno(), upstream.fileno(), *(p.rfd for p in pipes)]
        return any(ioctl_int(fd, SIOCINQ) > 0 for fd in fds)
    except OSError:
        return True  # a socket failed: a reset loses nothing more


async def _pump(
    src: socket.socket,
    dst: socket.socket,
    src_name: str,
    dst_name: str,
    pipe: _Pipe,
    flow: _Flow,
    count: Callable[[int], None],
) -> None:
    """Move one direction until EOF (then SHUT_WR on ``dst``) or a reset."""
    src_fd, dst_fd = src.fileno(), dst.fileno()
    pending = 0
    eof = False
    more = False
    drained = False
    chunks = 0
    while True:
        progressed = False
        if not eof and pending < pipe.capacity:
            want = pipe.capacity - pending
            try:
                n = os.splice(src_fd, pipe.wfd, want, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                # Source empty, or the pipe ran out of slots before bytes.
                pass
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise
                abort_on_close(dst)
                flow.end(f"{src_name}_reset")
                return
            else:
                if n == 0:
                    eof = True
                else:
                    pending += n
                    progressed = True
                    flow.touch()
                    more = n == want and ioctl_int(src_fd, SIOCINQ) > 0
                    drained = n < want
        if pending:
            flags = _SPLICE_FLAGS | (os.SPLICE_F_MORE if more and not eof else 0)
            try:
                m = os.splice(pipe.rfd, dst_fd, pending, flags=flags)
            except BlockingIOError:
                m = 0
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise
                abort_on_close(src)
                flow.end(f"{dst_name}_reset")
                return
            if m:
                pending -= m
                count(m)
                progressed = True
                flow.touch()
        if eof and not pending:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise
                abort_on_close(src)
                flow.end(f"{dst_name}_reset")
                return
            if flow.first_eof is None:
                flow.first_eof = f"{src_name}_eof"
            return
        if progressed:
            chunks += 1
            if drained and not pending:
                # The read took less than it could, so the source is (nearly always)
                # empty: wait for it rather than spend a splice on EAGAIN. Readiness
                # is level-triggered, so bytes that came meanwhile wake us at once.
                drained = False
                await trio.lowlevel.wait_readable(src_fd)
            elif chunks % _CHUNKS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()
        elif pending:
            await trio.lowlevel.wait_writable(dst_fd)
        else:
            await trio.lowlevel.wait_readable(src_fd)


async def _idle_watchdog(flow: _Flow, idle_timeout: float) -> None:
    while True:
        deadline = flow.last_activity + idle_timeout
        if trio.current_time() >= deadline:
            flow.end("idle_timeout")
            return
        await trio.sleep_until(deadline)


async def splice_relay(
    client: socket.socket,
    upstream: socket.socket,
    stats: RelayStats,
    *,
    idle_timeout: float | None,
) -> str:
    """Relay an established pair of non-blocking TCP sockets with splice(2).

    Args:
        client: The accepted client socket (non-blocking, connected).
        upstream: The connected upstream socket (non-blocking).
        stats: Updated in place as bytes are written to the other side.
        idle_timeout: Seconds without a byte in either direction before giving up;
            ``None`` for no limit.

    Returns:
        The close reason: ``"client_eof"`` or ``"backend_eof"`` (who sent FIN first
        when both sides closed normally), ``"client_reset"``, ``"backend_reset"``
        (the other socket then has ``SO_LINGER{1,0}`` so closing it sends an RST),
        or ``"idle_timeout"``. The sockets are left open for the caller.

    Raises:
        OSError: An unexpected error from splice(2) (not a peer reset), e.g.
            ``EINVAL`` when a socket does not support splicing.
    """

    def from_client(n: int) -> None:
        stats.bytes_from_client += n

    def to_client(n: int) -> None:
        stats.bytes_to_client += n

    pipes: list[_Pipe] = []
    try:
        pipes.append(_Pipe())
        pipes.append(_Pipe())
        async with trio.open_nursery() as nursery:
            flow = _Flow(nursery.cancel_scope)
            if idle_timeout is not None:
                nursery.start_soon(_idle_watchdog, flow, idle_timeout)
            async with trio.open_nursery() as pumps:
                pumps.start_soon(
                    _pump, client, upstream, "client", "backend", pipes[0], flow, from_client
                )
                pumps.start_soon(
                    _pump, upstream, client, "backend", "client", pipes[1], flow, to_client
                )
            # Both directions ended with EOF: only the watchdog is left to stop.
            nursery.cancel_scope.cancel()
        if flow.reason == "idle_timeout" and _in_flight(client, upstream, pipes):
            # Rule 4: those bytes die with the flow; a FIN after them would tell the
            # peer the stream ended where the timeout cut it.
            abort_on_close(client)
            abort_on_close(upstream)
    finally:
        for pipe in pipes:
            pipe.close()
    if flow.reason is not None:
        return flow.reason
    assert flow.first_eof is not None
    return flow.first_eof


def splice_self_test(timeout: float = 2.0) -> str | None:
    """Check that splice(2) works for TCP over loopback on this host.

    Sends a small non-repeating payload, splices it socket → pipe → socket back to
    the sender and compares. Synchronous; meant for start-up.

    Args:
        timeout: Seconds to wait for each step.

    Returns:
        ``None`` when splicing works, otherwise a one-line reason.
    """
    payload = b"".join(i.to_bytes(4, "big") for i in range(1024))
    socks: list[socket.socket] = []
    pipe: _Pipe | None = None
    try:
        lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(lsn)
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        a = socket.create_connection(lsn.getsockname(), timeout=timeout)
        socks.append(a)
        b, _ = lsn.accept()
        socks.append(b)
        b.setblocking(False)
        pipe = _Pipe()
        a.sendall(payload)
        poller = select.poll()
        poller.register(b.fileno(), select.POLLIN)
        left = len(payload)
        while left:
            if not poller.poll(timeout * 1000):
                return f"splice self-test: no data within {timeout}s"
            n = os.splice(b.fileno(), pipe.wfd, left, flags=_SPLICE_FLAGS)
            if n == 0:
                return "splice self-test: unexpected EOF"
            out = n
            while out:
                # 4 KiB always fits an empty loopback send buffer, so no EAGAIN here.
                out -= os.splice(pipe.rfd, b.fileno(), out, flags=os.SPLICE_F_MOVE)
            left -= n
        echoed = _recv_exact(a, len(payload), timeout)
        if echoed != payload:
            return f"splice self-test: echoed {len(echoed)} bytes, not the {len(payload)} sent"
        return None
    except OSError as exc:
        return f"splice self-test failed: {exc.strerror or exc}"
    finally:
        if pipe is not None:
            pipe.close()
        for s in socks:
            s.close()


def _recv_exact(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
