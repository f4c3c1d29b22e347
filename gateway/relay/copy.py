"""The core's userspace relay tier ("copy"): bytes both ways between two sockets.

Rules kept here:

1. **Bounded memory, natural backpressure.** A direction reads into one
   scratch buffer shared by every flow of the process and writes it out before
   it reads again. No ``await`` separates the read from the first write
   attempt, so the shared buffer is safe in trio's single thread; only bytes
   the destination could not take at once are copied out and held, so a
   congested direction holds at most ``buffer_size`` bytes and an idle flow
   holds none. While they wait, the source is not read: its TCP window closes.
2. **Half-close is propagated, not collapsed.** EOF from one side becomes
   ``shutdown(SHUT_WR)`` on the other; the other direction keeps flowing
   until its own EOF.
3. **A reset stays a reset.** A reset (or write error) on one side sets
   ``SO_LINGER{1,0}`` on the other, so the caller's close sends an RST rather
   than a FIN that would pass a truncation off as a clean end. The same holds
   for a pair cut by its idle timeout while bytes were on the way (held here
   because the destination would not take them, or received and not read yet):
   both sides get an RST, so neither takes the cut stream for a whole one.
4. **Fair and cancellable.** Every wait is a trio checkpoint, and a direction
   that never has to wait checkpoints every few chunks anyway.
5. **The caller owns the sockets** and closes them.
6. **One task per pair.** Both directions are moved by the task that called
   :meth:`CopyRelay.run`: its two sockets are registered once in the process's
   poller (gateway/relay/poller.py, edge-triggered) and the task waits there for
   whichever side has work. A nursery and a second task per connection cost
   about a third of an idle connection's memory and ~10 % of a new
   connection's CPU (bench/README.md, "Per-connection cost"). Each read goes on
   until EAGAIN (or a checkpoint), as an edge-triggered wait requires, except
   that a short read ends it: TCP returns less than asked only when its queue
   ran empty, and each segment that arrives later raises a new edge, so the read
   that would meet EAGAIN is saved (two syscalls of a request/response exchange,
   as HAProxy does). Not when the event that made the side readable said the
   peer's FIN is queued: no later edge comes for it, so reading goes on to it.
7. **The inner loop is compiled where it can be.** Reading and writing whole
   chunks until EAGAIN, a short read, a held chunk, an end or the budget is
   ``gateway/relay/_copystep.c`` ``move``: one call where the socket module
   makes two per chunk (bench/README.md, "A compiled copy step"). Everything
   else (holding, half-close, resets, the deadline, promotion) stays here and
   runs alike for both loops. Without the module (``STEP_WHY_NOT`` says why) the
   same loop runs in Python. A promotion by bytes stops both loops at the chunk
   that reaches it; one by age is checked once per call, so the compiled loop may
   move up to a budget of chunks past it.
8. **A parked pair's events are served without Python where they can be.** While a
   pair is parked holding nothing and not stopping for a promotion, its ``fast`` path
   (a tuple: the two descriptors, the scratch buffer, the stats, the idle timeout, the
   clock's offset, the budget, the sides whose direction ended, the promotion's byte
   count and time, the flow whose span hears of a half-close) lets the compiled
   delivery (gateway/relay/poller.py rule 6) move the bytes of an event that says
   "readable" or "end" and count them, as ``_step`` and ``_moved`` would, and end a
   direction whose end its move meets, as ``_eof`` would (``end_direction`` in
   _copystep.c: no Python frame, where the hand-over to ``ready`` ran six and a call
   back into Python two; a short connection has two ends). Anything else (a reset, a
   held chunk, a full budget, an idle deadline due to move, a promotion due) it hands
   to :meth:`_Pair.ready` with what the move stopped at, to be handled here; an event
   that says "error" goes to :meth:`_Pair.ready` as before. The pair's task is woken
   for the same things as with the Python delivery (bench/README.md, "The delivery
   compiled", "Ends in the compiled delivery"). The task itself has the client's first
   bytes served that way as the relay starts (``_copystep.serve``), where it ran a
   whole step in Python ("A pair's ends and first bytes in the compiled delivery").
"""

from __future__ import annotations

import math
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any, ClassVar, Final

import trio
from trio.lowlevel import checkpoint, current_task

from gateway.flow import CloseReason, Flow
from gateway.linux import SIOCINQ, ioctl_int
from gateway.relay.idletimer import SLACK, IdleTimer
from gateway.relay.poller import READABLE, FastPath, Poller, Waiter
from gateway.relay.poller import current as current_poller
from gateway.relay.stats import RelayStats, TierCounters
from gateway.runloop import park

try:
    from gateway.relay import _copystep
except ImportError as exc:  # not built: L4GW_NO_EXT=1, or sources run without an install
    _copystep = None  # type: ignore[assignment]
    STEP_WHY_NOT: str | None = f"gateway.relay._copystep is not built ({exc})"
else:
    STEP_WHY_NOT = None
COMPILED = _copystep is not None
"""Whether a new :class:`CopyRelay` moves chunks with the compiled loop (rule 7); the
tests set it False to run the Python loop where the module is built."""


def loop_report() -> str:
    """Which loop the copy tier runs, for the start log and ``l4gw accel status``."""
    return "compiled loop" if COMPILED else f"loop in Python: {STEP_WHY_NOT or 'chosen'}"


_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_READABLE_EVENT: Final = select.EPOLLIN
"""The event a relay's first step serves the client's side for (rule 8)."""
_CHUNKS_PER_CHECKPOINT: Final = 16


class RelayReset(Exception):
    """A direction of a pair met a reset; ``reason`` is the flow's close reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


async def both_directions(
    pump: Callable[..., Awaitable[None]],
    backend_to_client: tuple[Any, ...],
    client_to_backend: tuple[Any, ...],
) -> str | None:
    """Run ``pump`` for both directions of a pair until both end.

    Returns:
        None when both ended normally, else the reason of the first
        :class:`RelayReset` (both directions can fail together; any reset
        wins over the rest).
    """
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, *backend_to_client)
            await pump(*client_to_backend)
    except RelayReset as reset:
        return reset.reason
    except BaseExceptionGroup as group:
        resets = group.subgroup(RelayReset)
        if resets is None:
            raise
        first = resets.exceptions[0]
        assert isinstance(first, RelayReset)
        return first.reason
    return None


def abort_on_close(sock: socket.socket) -> None:
    """Make the next close() of ``sock`` send an RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


def _unread(sock: socket.socket) -> int:
    """Bytes ``sock`` received that nobody read yet (0 once it is gone)."""
    try:
        return ioctl_int(sock.fileno(), SIOCINQ)
    except OSError:
        return 0


@dataclass(slots=True)  # not frozen: a frozen init cost 0.3 us more, once per flow
class Promotion:
    """When a flow leaves the copy tier for a kernel tier.

    Attributes:
        after_bytes: promote once this many bytes moved (both directions).
        at: promote at this ``time.monotonic()`` (checked when bytes move): the
            clock a flow's ``started_monotonic`` is on, so "once the flow is this
            old" needs no clock read of its own (the relay reads the run's clock
            once and shifts it onto that).
    """

    after_bytes: int
    at: float


class CopyRelay:
    """The copy tier; one instance per process holds the shared scratch buffer."""

    def __init__(self, buffer_size: int) -> None:
        self._scratch = bytearray(buffer_size)
        self._view = memoryview(self._scratch)
        self.compiled = COMPILED
        """Whether this relay's chunks go through the compiled loop (rule 7)."""
        self._poller: Poller | None = None
        """The poller of the trio run it last relayed in (a RunVar lookup per flow
        otherwise: two calls); replaced once that run is over."""

    async def run(
        self,
        client: socket.socket,
        upstream: socket.socket,
        stats: RelayStats,
        idle_timeout: float,
        promotion: Promotion | None = None,
        counters: TierCounters | None = None,
    ) -> str | None:
        """Relay until both directions ended, one side reset, or the pair idled.

        With ``promotion``, return None as soon as it is due while both
        directions are still open: at that point no byte is held in
        userspace, so a kernel tier can take the sockets over in order.

        One task moves both directions (rule 6): the two sockets are registered
        once in the process's poller (gateway/relay/poller.py) and the task waits
        there for whichever side is ready.

        With ``counters``, the flow counts in them while it is here (``flows_now``,
        ``flows_total``, and the bytes it moved here).

        Returns:
            The close reason (a :class:`CloseReason` value), or None when promoted.
        """
        poller = self._poller
        if poller is None or not poller.alive:
            poller = self._poller = current_poller()
        timer = poller.timer
        pair = _Pair(idle_timeout, promotion, timer)
        cfd, ufd = client.fileno(), upstream.fileno()
        c2u = _FromClient(client, upstream, cfd, ufd)
        u2c = _FromUpstream(upstream, client, ufd, cfd)
        pair.relay, pair.c2u, pair.u2c, pair.stats = self, c2u, u2c, stats
        if self.compiled and timer.offset is not None:
            # Rule 8: what the compiled delivery needs to move an event's bytes,
            # indexed by side (_UPSTREAM, _CLIENT) as the poller's owners are; no
            # direction has ended yet.
            pair.fast = pair.fastpath = (
                ufd,
                cfd,
                self._scratch,
                stats,
                float(idle_timeout or 0),
                timer.offset,
                _CHUNKS_PER_CHECKPOINT,
                0,
                pair.promote_bytes if pair.promoting else -1,
                pair.promote_at if pair.promoting else 0.0,
                stats if isinstance(stats, Flow) else None,
            )
        if counters is not None:
            counters.flows_now += 1
            counters.flows_total += 1
            before = stats.bytes_from_client + stats.bytes_to_client
        try:
            if idle_timeout:
                timer.set(pair, pair.deadline)
            poller.register(cfd, pair, _CLIENT)
            poller.register(ufd, pair, _UPSTREAM)
            if pair.fast is not None and _serve(pair, _CLIENT, _READABLE_EVENT, perf_counter):
                # Rule 8: the client's first bytes (it has usually sent them by now)
                # were moved as the compiled delivery moves a parked pair's, with no
                # step in Python, and nothing else can move until an event says so.
                pair.task = current_task()
                await park(pair.abort)
            # Move bytes both ways until both ended, a reset (its reason is returned),
            # the pair idled or a promotion is due. While the task is parked, the
            # poller may move bytes for it (_Pair.ready); what it could not finish
            # wakes the task, which takes it from there. In this frame, not a helper
            # coroutine: every wakeup of the task passes through each frame it awaits in.
            while True:
                if pair.error is not None:
                    raise pair.error  # raised by a step the poller ran for this pair
                reset = pair.failure
                if reset is None:
                    if c2u.done and u2c.done:
                        # Ended while parked (a short connection's task is woken
                        # for this): a step would find nothing to do.
                        break
                    reset = self._step(pair)
                if reset is not None:
                    return reset
                if c2u.done and u2c.done:
                    break
                if pair.expired:  # the idle timer woke the task (gateway/relay/idletimer.py)
                    break
                if pair.stopping and not pair.holding:
                    pair.promoted = True
                    break
                if pair.chunks >= _CHUNKS_PER_CHECKPOINT:
                    # Rule 4: a pair that never has to wait lets the others run.
                    pair.chunks = 0
                    await checkpoint()
                    continue
                pair.chunks = 0
                # Nothing can move until an event says so (_step's docstring): park
                # until the poller reschedules the task (gateway/relay/poller.py, rule 2).
                pair.task = current_task()
                await park(pair.abort)
        finally:
            timer.cancel(pair)
            pair.relay = None  # no more moving where the poller delivers events
            pair.fast = None
            if counters is not None:
                counters.flows_now -= 1
                counters.bytes += stats.bytes_from_client + stats.bytes_to_client - before
            if pair.promoted:
                # A kernel tier takes the sockets on: out of the set, not only forgotten.
                poller.unregister(cfd)
                poller.unregister(ufd)
            else:
                poller.forget(cfd)
                poller.forget(ufd)
        if pair.promoted:
            return None
        if pair.expired:
            if pair.holding or _unread(client) > 0 or _unread(upstream) > 0:
                # Rule 3: the bytes on the way die with the pair; a FIN after them
                # would tell the peer the stream ended where the timeout cut it.
                abort_on_close(client)
                abort_on_close(upstream)
            return CloseReason.IDLE_TIMEOUT
        return pair.first_eof or CloseReason.CLIENT_EOF

    def _step(self, pair: _Pair) -> str | None:
        """One pass over both directions: move what can move without waiting.

        Synchronous (rule 1: no ``await`` between a read into the shared buffer and
        its write), so the pair's task and the poller (for a parked pair) may both
        run it. Returns the close reason of a reset, else None.

        A pass that returns None with its chunk budget (rule 4) not spent and no
        promotion due leaves nothing that could move without a new event: it leaves a
        direction only at its end, at EAGAIN or a short read (its readable flag
        cleared), or with a chunk held for a destination that said EAGAIN (its
        writable flag cleared), and only events set those flags again. So its callers
        park the pair (or leave it parked) without looking again.
        """
        view = self._view
        size = len(view)
        compiled = self.compiled
        stats = pair.stats
        readable, writable = pair.readable, pair.writable
        for d in (pair.c2u, pair.u2c):
            if d.done:
                continue
            src_side, dst_side = d.sides
            if d.pending is not None:
                if not writable[dst_side]:
                    continue
                reset = self._send_held(d, pair)
                if reset is not None:
                    return reset
                if d.pending is not None:
                    continue
            if compiled and readable[src_side] and not pair.stopping:
                # Rule 7: the loop below, in one call; what it stopped at is handled
                # here as the loop below handles it.
                budget = _CHUNKS_PER_CHECKPOINT - pair.chunks
                if budget < 1:
                    budget = 1  # as below: one chunk per direction and pass at least
                limit = 0
                if pair.promoting:
                    limit = pair.promote_bytes - stats.bytes_from_client - stats.bytes_to_client
                    if limit < 1:
                        limit = 1
                status, moved, chunks, sent, n = _move(
                    self._scratch, d.src_fd, d.dst_fd, budget, readable[src_side] == READABLE, limit
                )
                reset = self._after_move(d, pair, status, moved, chunks, sent, n)
                if reset is not None:
                    return reset
                continue
            while readable[src_side] and not pair.stopping:
                try:
                    n = d.src.recv_into(view, size)
                except BlockingIOError:
                    readable[src_side] = 0
                    break
                except OSError:
                    abort_on_close(d.dst)
                    return d.src_reset
                if n == 0:
                    self._eof(d, stats, pair)
                    break
                try:
                    sent = d.dst.send(view[:n])
                except BlockingIOError:
                    sent = 0
                except OSError:
                    abort_on_close(d.src)
                    return d.dst_reset
                if sent < n:
                    self._hold(d, pair, sent, n)
                    break
                self._moved(d, n, stats, pair)
                pair.chunks += 1
                if n < size and readable[src_side] == READABLE:
                    # A short read emptied the queue (rule 6): wait for the next edge.
                    readable[src_side] = 0
                    break
                if pair.chunks >= _CHUNKS_PER_CHECKPOINT:
                    break
        return None

    def _after_move(
        self, d: _Direction, pair: _Pair, status: int, moved: int, chunks: int, sent: int, n: int
    ) -> str | None:
        """What the compiled loop stopped at for ``d`` (``_copystep.move``'s tuple),
        handled as the Python loop handles it; the close reason of a reset, else None."""
        if moved:
            pair.chunks += chunks
            self._moved(d, moved, pair.stats, pair)
        if status <= _SHORT:
            pair.readable[d.sides[0]] = 0
        elif status == _HELD:
            self._hold(d, pair, sent, n)
        elif status == _END:
            self._eof(d, pair.stats, pair)
        elif status == _SRC_ERROR:
            abort_on_close(d.dst)
            return d.src_reset
        elif status == _DST_ERROR:
            abort_on_close(d.src)
            return d.dst_reset
        return None

    def _hold(self, d: _Direction, pair: _Pair, sent: int, n: int) -> None:
        """The destination took ``sent`` of the chunk of ``n`` bytes in the scratch
        buffer: congested. Hold only what it did not take (rule 1), and read no more
        from this source until it has."""
        d.pending = memoryview(bytes(self._view[sent:n]))
        d.held = n
        pair.holding += 1
        pair.writable[d.sides[1]] = False
        pair.fast = None  # rule 8: a pair holding bytes is served in Python

    def _send_held(self, d: _Direction, pair: _Pair) -> str | None:
        """Send the rest of a chunk ``d`` holds; the reset's reason if it failed.
        ``d.pending`` is None once all of it went."""
        try:
            while d.pending:
                d.pending = d.pending[d.dst.send(d.pending) :]
        except BlockingIOError:
            pair.writable[d.sides[1]] = False
            return None
        except OSError:
            abort_on_close(d.src)
            return d.dst_reset
        d.pending = None
        pair.holding -= 1
        if not pair.holding and not pair.stopping:
            pair.fast = pair.fastpath  # rule 8: nothing held again
        self._moved(d, d.held, pair.stats, pair)
        return None

    @staticmethod
    def _moved(d: _Direction, n: int, stats: RelayStats, pair: _Pair) -> None:
        if d.from_client:
            stats.bytes_from_client += n
        else:
            stats.bytes_to_client += n
        # One clock read per chunk serves the idle deadline and the promotion; on
        # trio's own clock, without a Python call (IdleTimer.offset).
        timer = pair.timer
        offset = timer.offset
        now = timer.now() if offset is None else offset + perf_counter()
        idle = pair.idle
        if idle and pair.deadline < now + idle:
            # Moving the deadline per chunk would move the pair between the timer's
            # buckets per chunk (with a trio deadline, re-sorting its heap cost 16%
            # of the CPU of a keepalive request: bench/README.md). So it moves only
            # once it has fallen behind "now + idle", and then with 1/64 of slack: an
            # idle pair closes between idle and idle * 1.016 (+ the timer's 10 ms
            # quantum) after its last byte, never early. Inline: a call per chunk.
            pair.deadline = now + idle * SLACK
            pair.expired = False  # bytes moved as it expired: it lives on
            timer.set(pair, pair.deadline)
        if pair.promoting and (
            stats.bytes_from_client + stats.bytes_to_client >= pair.promote_bytes
            or now >= pair.promote_at
        ):
            # Stop reading; a direction still holding bytes delivers them first,
            # so the kernel tier takes over with nothing held here.
            pair.stopping = True
            pair.fast = None  # rule 8: a pair stopping is served in Python

    @staticmethod
    def _eof(d: _Direction, stats: RelayStats, pair: _Pair) -> None:
        """The direction ``d`` of ``pair`` met its source's end."""
        d.done = True
        first = pair.first_eof is None
        if first:
            pair.first_eof = CloseReason.CLIENT_EOF if d.from_client else CloseReason.BACKEND_EOF
            if isinstance(stats, Flow):
                # The flow's span shows when it became half-closed, and by whom.
                stats.add_event("half_closed", by="client" if d.from_client else "backend")
        # A half-closed pair stays in this tier: kernel tiers need both open.
        pair.promoting = False
        pair.stopping = False
        fastpath = pair.fastpath
        if fastpath is not None:
            # Rule 8: the fast path serves the direction still open and skips this one,
            # with no promotion to come.
            pair.fastpath = fastpath = (
                *fastpath[:7],
                fastpath[7] | 1 << d.sides[0],
                -1,
                0.0,
                fastpath[10],
            )
            pair.fast = None if pair.holding else fastpath
        if first:
            try:
                d.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        # else both directions are over: ``dst`` sent its EOF and every byte before
        # it was read, so the caller's close() sends the FIN with no RST risk, and a
        # shutdown() here would be one more syscall for it.


_CLIENT: Final = 1
_UPSTREAM: Final = 0

if _copystep is not None:
    _move, _serve = _copystep.move, _copystep.serve
    _SHORT, _HELD, _END = _copystep.SHORT, _copystep.HELD, _copystep.END
    _SRC_ERROR, _DST_ERROR = _copystep.SRC_ERROR, _copystep.DST_ERROR
    # CopyRelay._step reads "status <= _SHORT" as "the source has nothing more now".
    assert _copystep.DRAINED < _SHORT < min(_copystep.BUDGET, _copystep.LIMIT, _HELD, _END)
    # The compiled delivery ends a direction as _eof does (rule 8), with these reasons.
    assert (_copystep.CLIENT_EOF, _copystep.BACKEND_EOF) == (
        CloseReason.CLIENT_EOF,
        CloseReason.BACKEND_EOF,
    )


class _Direction:
    """One direction of a pair: where from, where to, what it holds. What tells the two
    directions apart is their class's (:class:`_FromClient`, :class:`_FromUpstream`),
    not set per flow."""

    __slots__ = ("done", "dst", "dst_fd", "held", "pending", "src", "src_fd")

    from_client: ClassVar[bool]
    sides: ClassVar[tuple[int, int]]
    """The pair's flags of its source's side and its destination's."""
    src_reset: ClassVar[str]
    """The close reason of a reset met reading the source."""
    dst_reset: ClassVar[str]
    """The close reason of a reset met writing to the destination."""

    def __init__(self, src: socket.socket, dst: socket.socket, src_fd: int, dst_fd: int) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.done = False
        self.pending: memoryview | None = None
        self.held = 0
        """Bytes of the chunk ``pending`` is the rest of (counted once all are sent)."""


class _FromClient(_Direction):
    __slots__ = ()
    from_client = True
    sides = (_CLIENT, _UPSTREAM)
    src_reset = CloseReason.CLIENT_RESET
    dst_reset = CloseReason.BACKEND_RESET


class _FromUpstream(_Direction):
    __slots__ = ()
    from_client = False
    sides = (_UPSTREAM, _CLIENT)
    src_reset = CloseReason.BACKEND_RESET
    dst_reset = CloseReason.CLIENT_RESET


class _Pair(Waiter):
    """State shared by the two directions of one pair: idle deadline, EOFs, promotion."""

    __slots__ = (
        "c2u",
        "chunks",
        "deadline",
        "error",
        "expired",
        "failure",
        "fastpath",
        "first_eof",
        "holding",
        "idle",
        "promote_at",
        "promote_bytes",
        "promoted",
        "promoting",
        "relay",
        "stats",
        "stopping",
        "timer",
        "timer_key",
        "u2c",
    )

    c2u: _Direction
    u2c: _Direction
    stats: RelayStats

    def __init__(self, idle: float, promotion: Promotion | None, timer: IdleTimer) -> None:
        # Waiter's fields, set here rather than by its __init__ (a call less per flow),
        # as a relay starts: the client has usually sent its first bytes by now; the
        # upstream has not been sent anything yet (if it speaks first, registering
        # reports it). Both sides are writable. Indexed by side (_UPSTREAM, _CLIENT).
        self.task = None
        self.readable = [0, READABLE]
        self.writable = [True, True]
        self.fast = None
        self.fastpath: FastPath | None = None
        """The fast path (rule 8) while the relay runs compiled; ``fast`` is it while
        the pair holds nothing and is not stopping for a promotion."""
        offset = timer.offset
        now = timer.now() if offset is None else offset + perf_counter()  # as in _moved
        # With the slack of _moved already, so the first chunks do not move it.
        self.deadline = now + idle * SLACK if idle else math.inf
        """When the pair expires unless bytes move (the timer's bucket rounds it up)."""
        self.timer = timer
        self.timer_key = 0
        """The timer's bucket (0: none)."""
        self.expired = False
        """The idle timer found the pair past its deadline (and woke its task)."""
        self.idle = idle
        self.promoting = promotion is not None
        """Whether a promotion may come (then ``promote_bytes`` and ``promote_at`` are
        set; a flow that cannot be promoted spends nothing on them)."""
        if promotion is not None:
            self.promote_bytes = promotion.after_bytes
            self.promote_at = promotion.at - monotonic() + now
            """On the run's clock, which the chunks read."""
        self.promoted = False
        self.stopping = False
        """The promotion is due: read no more, deliver what is held, then hand over."""
        self.first_eof: str | None = None
        self.holding = 0
        """Directions holding bytes their destination has not taken yet."""
        self.relay: CopyRelay | None = None
        """While the pair is relayed: who moves its bytes (the poller asks it too)."""
        self.chunks = 0
        """Chunks moved since the last wait or checkpoint (rule 4)."""
        self.failure: str | None = None
        """A reset the poller met for the parked task (its close reason)."""
        self.error: Exception | None = None
        """An unexpected error the poller met for the parked task, raised by it."""

    def ready(
        self,
        side: int = -1,
        status: int = 0,
        moved: int = 0,
        chunks: int = 0,
        sent: int = 0,
        n: int = 0,
    ) -> bool:
        """Move what the event made movable, here where the poller delivers it; wake
        the pair's task only for what it must see: an end, a reset, a promotion due,
        or a full budget of chunks (rule 4).

        With arguments, from the compiled delivery's fast path (rule 8): what its move
        of the direction from ``side`` stopped at (``_copystep.move``'s tuple), which
        is Python's to handle (a reset, a held chunk, a full budget, an idle deadline
        due to move, a promotion due, or an end that came with one of the last two);
        handled first, as ``_step`` would have."""
        relay = self.relay
        if relay is None:
            return False
        try:
            reset = None
            if side >= 0:
                d = self.c2u if side == _CLIENT else self.u2c
                reset = relay._after_move(d, self, status, moved, chunks, sent, n)
            if reset is None:
                reset = relay._step(self)
        except Exception as exc:  # not the poller's to raise: the task raises it
            self.error = exc
            return False
        if reset is not None:
            self.failure = reset
            return False
        c2u, u2c = self.c2u, self.u2c
        if (c2u.done and u2c.done) or self.stopping:
            return False
        if self.chunks >= _CHUNKS_PER_CHECKPOINT:
            return False
        self.chunks = 0
        return True  # nothing else can move until an event (CopyRelay._step)
