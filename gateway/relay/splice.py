"""The splice(2) relay tier: payload moves socket → pipe → socket inside the kernel.

One task per flow moves both directions, as the copy tier does (gateway/relay/copy.py
rule 6): the two sockets are registered once in the process's relay poller and the
task alternates ``splice(src, pipe)`` and ``splice(pipe, dst)`` on non-blocking
descriptors for whichever side is ready, and parks in the poller, armed for what it
waits for (rule 3), when nothing can move. The idle timeout is the poller's idle
timer.

Rules kept (reference/sockmap.md §6 and rule 19):

1. **Backpressure is the pipe.** A direction reads from its source only while its
   pipe has room and waits for the destination to become writable while the pipe
   holds bytes, so a slow reader closes the sender's TCP window and memory per flow
   is bounded by a pipe per direction plus the socket buffers.
2. **A pipe only while bytes are in it.** A direction takes a pipe from the run's pool
   (gateway/relay/pipes.py) when its source has bytes and gives it back once the pipe
   is empty: an idle flow holds no pipe, so it holds its two sockets' descriptors and
   nothing else (two pipes per flow were four more descriptors and 19.5 KB of the
   process per idle flow: bench/README.md). When no pipe can be made (out of
   descriptors), the relay waits for a direction that holds one to empty it, and raises
   that ``OSError`` once nothing is in any pipe: the caller carries the flow on in
   another tier, with nothing lost.
3. **Armed for what the task waits for, one-shot.** Before it parks, the task asks the
   poller for exactly the events that would give it work: readable on a source it
   would read, writable on a destination its pipe waits for (``EPOLLONESHOT``,
   level-triggered, so nothing that came before is missed). Registered edge-triggered
   for every event instead, each skb and each ACK of a bulk flow went through the
   poller's epoll set and woke it up to trio's (kernel work in softirq): 17–24 % more
   CPU per GB than waiting one-shot (bench/README.md). A source is known to be empty
   only when splicing into an *empty* pipe says ``EAGAIN`` (a pipe out of slots says
   ``EAGAIN`` too); a short splice proves nothing (the pipe may have run out of slots
   before the source ran out of bytes).
4. **SPLICE_F_MORE only when more data is known to follow** (the read filled the
   pipe's free space and ``FIONREAD`` on the source is still non-zero): ``MSG_MORE``
   corks a partial segment with no timer, and a request/response flow would stall.
5. **Half-close after the drain.** EOF from one side becomes ``shutdown(SHUT_WR)`` on
   the other only once that direction's pipe is empty; the other direction keeps
   flowing until its own EOF.
6. **A reset is never turned into a clean FIN.** An error on either side
   (``ECONNRESET``, ``EPIPE``, ...) sets ``SO_LINGER{1,0}`` on the other socket, so
   the caller's ``close()`` sends an RST; bytes that were in flight are then known
   to the peer as lost rather than silently truncated. An idle timeout that cuts
   the flow while bytes are on the way (in a pipe, or received and not spliced
   yet) sets it on both sockets, for the same reason.
7. **Never busy-loop, stay fair.** A flow parks whenever nothing can move, and one
   that keeps moving checkpoints every ``_CHUNKS_PER_CHECKPOINT`` chunks so one bulk
   flow cannot starve the loop.
8. **The caller owns the sockets.** Nothing here closes them.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import struct
from typing import Final

from trio.lowlevel import checkpoint, current_task

from gateway.linux import SIOCINQ, ioctl_int
from gateway.relay.idletimer import SLACK
from gateway.relay.pipes import PIPE_SIZE, Pipe, PipePool
from gateway.relay.poller import READABLE, Poller, Waiter
from gateway.relay.poller import current as current_poller
from gateway.relay.stats import RelayStats
from gateway.runloop import park

__all__ = ["CLOSE_REASONS", "OUT_OF_FDS", "PIPE_SIZE", "splice_relay", "splice_self_test"]

CLOSE_REASONS: Final = frozenset(
    {"client_eof", "backend_eof", "client_reset", "backend_reset", "idle_timeout"}
)

_CHUNKS_PER_CHECKPOINT: Final = 16
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
OUT_OF_FDS: Final = frozenset({errno.EMFILE, errno.ENFILE})
"""What :func:`splice_relay` raises when no pipe can be made (rule 2)."""

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
_CLIENT: Final = 0
_UPSTREAM: Final = 1
# Rule 3. ERR and HUP are always reported (a reset wakes a parked flow).
_ONESHOT: Final = select.EPOLLONESHOT
_READ: Final = select.EPOLLIN | select.EPOLLRDHUP


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


class _Direction:
    """One direction of a flow: its sockets, its pipe while lent, what is in it."""

    __slots__ = (
        "count_to_client",
        "done",
        "dst",
        "dst_fd",
        "dst_reset",
        "dst_side",
        "eof",
        "first_eof",
        "in_blocked",
        "more",
        "pending",
        "pipe",
        "src",
        "src_fd",
        "src_reset",
        "src_side",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.src_side = _CLIENT if from_client else _UPSTREAM
        self.dst_side = _UPSTREAM if from_client else _CLIENT
        self.count_to_client = not from_client
        self.src_reset = "client_reset" if from_client else "backend_reset"
        self.dst_reset = "backend_reset" if from_client else "client_reset"
        self.first_eof = "client_eof" if from_client else "backend_eof"
        self.pipe: Pipe | None = None
        self.pending = 0
        """Bytes in the pipe (rule 2: the pipe is lent while this is not 0)."""
        self.eof = False
        self.done = False
        self.more = False
        self.in_blocked = False
        """The last splice into a non-empty pipe said EAGAIN: the source may be empty or
        the pipe out of slots (rule 3); try again once the pipe has drained some."""


class _Flow(Waiter):
    """One flow's two directions, its idle deadline and how it ends."""

    __slots__ = (
        "c2u",
        "chunks",
        "deadline",
        "expired",
        "first_eof",
        "idle",
        "no_pipe",
        "timer_key",
        "u2c",
    )

    def __init__(self, c2u: _Direction, u2c: _Direction, idle: float, now: float) -> None:
        # Waiter's fields. Both sides may have bytes already (one EAGAIN each if not),
        # and both are writable; the poller sets them again on every edge.
        self.task = None
        self.readable = [READABLE, READABLE]
        self.writable = [True, True]
        self.fast = None
        self.c2u, self.u2c = c2u, u2c
        self.idle = idle
        self.deadline = now + idle * SLACK if idle else math.inf
        self.expired = False
        self.timer_key = 0
        self.first_eof: str | None = None
        self.chunks = 0
        self.no_pipe: OSError | None = None
        """No pipe could be made for a direction with bytes to move (rule 2)."""

    def ready(self) -> bool:
        """An event the parked task cannot act on leaves it parked: an error or hang-up
        on a socket it neither reads nor writes now (a client reset while the task
        waits for the backend's bytes). Those are always reported and level-triggered,
        so waking to re-arm would report them again at once, round and round; the flow
        meets the error when it next uses that socket."""
        return not self.can_move()

    def can_move(self) -> bool:
        """Whether some direction has work it can do without waiting."""
        for d in (self.c2u, self.u2c):
            if d.done:
                continue
            if d.pending and self.writable[d.dst_side]:
                return True
            if d.eof and not d.pending:
                return True  # the half-close to pass on
            if self.readable[d.src_side] and self.would_read(d):
                return True
        return False

    def would_read(self, d: _Direction) -> bool:
        """Whether ``d`` reads its source as soon as it has bytes."""
        return (
            not d.done
            and not d.eof
            and not d.in_blocked
            and (d.pipe is not None or self.no_pipe is None)
            and (d.pipe is None or d.pending < d.pipe.capacity)
        )

    def arm(self, poller: Poller) -> None:
        """Before the task parks: ask the poller for each socket's events that would
        give it work (rule 3), one-shot."""
        c2u, u2c = self.c2u, self.u2c
        for src_of, dst_of in ((c2u, u2c), (u2c, c2u)):
            events = _ONESHOT
            if self.would_read(src_of):
                events |= _READ
            if dst_of.pending and not dst_of.done:
                events |= select.EPOLLOUT
            poller.modify(src_of.src_fd, events)


def _cut(exc: OSError, other: socket.socket) -> None:
    """A side is gone: the other gets an RST at its close (rule 6). Any other error is
    a bug in our use of splice(2), raised."""
    if exc.errno not in _PEER_GONE:
        raise exc
    abort_on_close(other)


def _in_flight(client: socket.socket, upstream: socket.socket, flow: _Flow) -> bool:
    """Whether bytes are between the two peers: in a pipe, or unread on a socket."""
    if flow.c2u.pending or flow.u2c.pending:
        return True
    try:
        return ioctl_int(client.fileno(), SIOCINQ) > 0 or ioctl_int(upstream.fileno(), SIOCINQ) > 0
    except OSError:
        return True  # a socket failed: a reset loses nothing more


def _step(flow: _Flow, pool: PipePool, stats: RelayStats) -> str | None:
    """Move what can move without waiting, in both directions; a reset's close reason,
    else None. Synchronous: nothing else runs between its splices."""
    readable, writable = flow.readable, flow.writable
    for d in (flow.c2u, flow.u2c):
        while not d.done:
            progressed = False
            pipe = d.pipe
            if (
                not d.eof
                and readable[d.src_side]
                and not d.in_blocked
                and (pipe is None or d.pending < pipe.capacity)
            ):
                if pipe is None:
                    try:
                        pipe = d.pipe = pool.take()
                    except OSError as exc:
                        if exc.errno not in OUT_OF_FDS:
                            raise
                        flow.no_pipe = exc
                if pipe is not None:
                    want = pipe.capacity - d.pending
                    try:
                        n = os.splice(d.src_fd, pipe.wfd, want, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        if d.pending:
                            d.in_blocked = True
                        else:
                            readable[d.src_side] = 0  # an empty pipe: the source is empty
                    except OSError as exc:
                        _cut(exc, d.dst)
                        return d.src_reset
                    else:
                        if n == 0:
                            d.eof = True
                        else:
                            d.pending += n
                            progressed = True
                            d.more = n == want and ioctl_int(d.src_fd, SIOCINQ) > 0
            if d.pending and writable[d.dst_side]:
                assert pipe is not None
                flags = _SPLICE_FLAGS | (os.SPLICE_F_MORE if d.more and not d.eof else 0)
                try:
                    m = os.splice(pipe.rfd, d.dst_fd, d.pending, flags=flags)
                except BlockingIOError:
                    writable[d.dst_side] = False
                except OSError as exc:
                    _cut(exc, d.src)
                    return d.dst_reset
                else:
                    d.pending -= m
                    d.in_blocked = False
                    if d.count_to_client:
                        stats.bytes_to_client += m
                    else:
                        stats.bytes_from_client += m
                    progressed = True
            if pipe is not None and not d.pending:
                pool.give(pipe)  # rule 2: lent only while bytes are in it
                d.pipe = None
                d.in_blocked = False
                flow.no_pipe = None  # a pipe is free now: the other may try again
            if d.eof and not d.pending:
                try:
                    d.dst.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    _cut(exc, d.src)
                    return d.dst_reset
                d.done = True
                if flow.first_eof is None:
                    flow.first_eof = d.first_eof
                break
            if not progressed:
                break
            flow.chunks += 1
            if flow.chunks >= _CHUNKS_PER_CHECKPOINT:
                break
    return None


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
        OSError: ``EMFILE``/``ENFILE`` when no pipe could be made and no byte is in
            any pipe (rule 2): every byte spliced so far was delivered, and the caller
            may relay the rest another way. Any other: an unexpected error from
            splice(2) (not a peer reset), e.g. ``EINVAL`` when a socket does not
            support splicing.
    """
    poller = current_poller()
    timer, pool = poller.timer, poller.pipes
    flow = _Flow(
        _Direction(client, upstream, True),
        _Direction(upstream, client, False),
        idle_timeout or 0.0,
        timer.now(),
    )
    c2u, u2c = flow.c2u, flow.u2c
    cfd, ufd = c2u.src_fd, u2c.src_fd
    reason: str | None = None
    try:
        if idle_timeout:
            timer.set(flow, flow.deadline)
        # Rule 3: armed only as the task parks, for what it waits for.
        poller.register(cfd, flow, _CLIENT, _ONESHOT)
        poller.register(ufd, flow, _UPSTREAM, _ONESHOT)
        while True:
            moved = stats.bytes_from_client + stats.bytes_to_client
            reason = _step(flow, pool, stats)
            if reason is not None:
                break
            if c2u.done and u2c.done:
                break
            if flow.idle and stats.bytes_from_client + stats.bytes_to_client != moved:
                now = timer.now()
                if flow.deadline < now + flow.idle:
                    flow.deadline = now + flow.idle * SLACK
                    flow.expired = False  # bytes moved as it expired: it lives on
                    timer.set(flow, flow.deadline)
            if flow.expired:
                reason = "idle_timeout"
                if _in_flight(client, upstream, flow):
                    # Rule 6: those bytes die with the flow; a FIN after them would
                    # tell the peer the stream ended where the timeout cut it.
                    abort_on_close(client)
                    abort_on_close(upstream)
                break
            if flow.no_pipe is not None and not (c2u.pending or u2c.pending):
                raise flow.no_pipe  # rule 2: nothing in flight, nothing lost
            if flow.chunks >= _CHUNKS_PER_CHECKPOINT:
                flow.chunks = 0
                await checkpoint()  # rule 7
                continue
            flow.chunks = 0
            if not flow.can_move():
                flow.arm(poller)
                flow.task = current_task()
                await park(flow.abort)
    finally:
        timer.cancel(flow)
        poller.forget(cfd)
        poller.forget(ufd)
        for d in (c2u, u2c):
            if d.pipe is not None:
                pool.give(d.pipe, empty=not d.pending)
                d.pipe = None
    if reason is not None:
        return reason
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
    pipe: Pipe | None = None
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
        pipe = Pipe()
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
