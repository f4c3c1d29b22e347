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
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from gateway.flow import CloseReason, Flow
from gateway.linux import SIOCINQ, ioctl_int
from gateway.relay.stats import RelayStats

_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_CHUNKS_PER_CHECKPOINT: Final = 16
_IDLE_SLACK: Final = 1 + 1 / 64


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


@dataclass(frozen=True, slots=True)
class Promotion:
    """When a flow leaves the copy tier for a kernel tier.

    Attributes:
        after_bytes: promote once this many bytes moved (both directions).
        at: promote at this ``trio.current_time()`` (checked when bytes move).
    """

    after_bytes: int
    at: float

    def due(self, stats: RelayStats) -> bool:
        return (
            stats.bytes_from_client + stats.bytes_to_client >= self.after_bytes
            or trio.current_time() >= self.at
        )


class CopyRelay:
    """The copy tier; one instance per process holds the shared scratch buffer."""

    def __init__(self, buffer_size: int) -> None:
        self._scratch = bytearray(buffer_size)
        self._view = memoryview(self._scratch)

    async def run(
        self,
        client: socket.socket,
        upstream: socket.socket,
        stats: RelayStats,
        idle_timeout: float,
        promotion: Promotion | None = None,
    ) -> str | None:
        """Relay until both directions ended, one side reset, or the pair idled.

        With ``promotion``, return None as soon as it is due while both
        directions are still open: at that point no byte is held in
        userspace, so a kernel tier can take the sockets over in order.

        Returns:
            The close reason (a :class:`CloseReason` value), or None when promoted.
        """
        pair = _Pair(idle_timeout, promotion)
        with pair.scope:
            if idle_timeout:
                pair.scope.deadline = trio.current_time() + idle_timeout
            reset = await both_directions(
                self._copy,
                (upstream, client, stats, False, pair),
                (client, upstream, stats, True, pair),
            )
            if reset is not None:
                return reset
        if pair.promoted:
            return None
        if pair.scope.cancelled_caught:
            if pair.holding or _unread(client) > 0 or _unread(upstream) > 0:
                # Rule 3: the bytes on the way die with the pair; a FIN after them
                # would tell the peer the stream ended where the timeout cut it.
                abort_on_close(client)
                abort_on_close(upstream)
            return CloseReason.IDLE_TIMEOUT
        return pair.first_eof or CloseReason.CLIENT_EOF

    async def _copy(
        self,
        src: socket.socket,
        dst: socket.socket,
        stats: RelayStats,
        from_client: bool,
        pair: _Pair,
    ) -> None:
        view = self._view
        size = len(view)
        chunks = 0
        src_reset = CloseReason.CLIENT_RESET if from_client else CloseReason.BACKEND_RESET
        dst_reset = CloseReason.BACKEND_RESET if from_client else CloseReason.CLIENT_RESET
        while not pair.promoted:
            try:
                n = src.recv_into(view, size)
            except BlockingIOError:
                pair.reading.add(from_client)
                try:
                    await wait_readable(src)
                finally:
                    pair.reading.discard(from_client)
                continue
            except OSError:
                abort_on_close(dst)
                raise RelayReset(src_reset)
            if n == 0:
                if pair.first_eof is None and isinstance(stats, Flow):
                    # The flow's span shows when it became half-closed, and by whom.
                    stats.add_event("half_closed", by="client" if from_client else "backend")
                pair.eof(CloseReason.CLIENT_EOF if from_client else CloseReason.BACKEND_EOF)
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                sent = dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError:
                abort_on_close(src)
                raise RelayReset(dst_reset)
            if sent < n:
                # The destination is congested: hold only what it did not take.
                pending = memoryview(bytes(view[sent:n]))
                # Left set if the idle timeout cancels the wait: run() then resets.
                pair.holding.add(from_client)
                while pending:
                    await wait_writable(dst)
                    try:
                        pending = pending[dst.send(pending) :]
                    except BlockingIOError:
                        pass
                    except OSError:
                        abort_on_close(src)
                        raise RelayReset(dst_reset)
                pair.holding.discard(from_client)
            if from_client:
                stats.bytes_from_client += n
            else:
                stats.bytes_to_client += n
            pair.touch()
            if pair.promotion is not None and pair.promotion.due(stats):
                pair.promote()
                return
            chunks += 1
            if chunks == _CHUNKS_PER_CHECKPOINT:
                chunks = 0
                await checkpoint()


class _Pair:
    """State shared by the two directions of one pair: idle deadline, EOFs, promotion."""

    __slots__ = ("first_eof", "holding", "idle", "promoted", "promotion", "reading", "scope")

    def __init__(self, idle: float, promotion: Promotion | None) -> None:
        self.scope = trio.CancelScope()
        self.idle = idle
        self.promotion = promotion
        self.promoted = False
        self.first_eof: str | None = None
        # The directions (from_client) waiting to read right now.
        self.reading: set[bool] = set()
        # The directions holding bytes their destination has not taken yet.
        self.holding: set[bool] = set()

    def touch(self) -> None:
        # Moving a trio deadline re-sorts the deadline heap; per chunk that
        # cost 16% of the CPU of a keepalive request (bench/README.md). So the
        # deadline moves only once it has fallen behind "now + idle", and then
        # with 1/64 of slack: an idle pair closes between idle and idle * 1.016
        # after its last byte, never early.
        if self.idle:
            now = trio.current_time()
            if self.scope.deadline < now + self.idle:
                self.scope.deadline = now + self.idle * _IDLE_SLACK

    def eof(self, reason: str) -> None:
        if self.first_eof is None:
            self.first_eof = reason
        # A half-closed pair stays in this tier: kernel tiers need both open.
        self.promotion = None

    def promote(self) -> None:
        self.promoted = True
        # Wake the other direction only if it is waiting to read: then it
        # holds no bytes. One that is writing finishes, then sees the flag.
        # The pair's own scope wakes it: run() tells promotion from an idle
        # timeout by the flag, and no scope per direction is needed (entering
        # one costs about as much as relaying a small chunk, bench/README.md).
        # (Cancelled while parked in wait_readable, it returns; already woken,
        # it sees the flag before it reads again.)
        if self.reading:
            self.scope.cancel()
