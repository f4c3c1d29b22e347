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
   than a FIN that would pass a truncation off as a clean end.
4. **Fair and cancellable.** Every wait is a trio checkpoint, and a direction
   that never has to wait checkpoints every few chunks anyway.
5. **The caller owns the sockets** and closes them.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from .flow import CloseReason
from .relay_stats import RelayStats

_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_CHUNKS_PER_CHECKPOINT: Final = 16


class _Reset(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def abort_on_close(sock: socket.socket) -> None:
    """Make the next close() of ``sock`` send an RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


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
    ) -> str:
        """Relay until both directions ended, one side reset, or the pair idled.

        Returns:
            The close reason (a :class:`CloseReason` value).
        """
        first_eof: list[str] = []
        scope = trio.CancelScope()
        state = _State(scope, idle_timeout)
        with scope:
            state.touch()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, upstream, client, stats, False, state, first_eof)
                    await self._pump(client, upstream, stats, True, state, first_eof)
            except _Reset as reset:
                return reset.reason
            except BaseExceptionGroup as group:
                # Both directions can fail together; any reset wins over the rest.
                resets = group.subgroup(_Reset)
                if resets is None:
                    raise
                first = resets.exceptions[0]
                assert isinstance(first, _Reset)
                return first.reason
        if scope.cancelled_caught:
            return CloseReason.IDLE_TIMEOUT
        return first_eof[0] if first_eof else CloseReason.CLIENT_EOF

    async def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        stats: RelayStats,
        from_client: bool,
        state: _State,
        first_eof: list[str],
    ) -> None:
        view = self._view
        size = len(view)
        chunks = 0
        src_reset = CloseReason.CLIENT_RESET if from_client else CloseReason.BACKEND_RESET
        dst_reset = CloseReason.BACKEND_RESET if from_client else CloseReason.CLIENT_RESET
        while True:
            try:
                n = src.recv_into(view, size)
            except BlockingIOError:
                await wait_readable(src)
                continue
            except OSError:
                abort_on_close(dst)
                raise _Reset(src_reset)
            if n == 0:
                first_eof.append(CloseReason.CLIENT_EOF if from_client else CloseReason.BACKEND_EOF)
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
                raise _Reset(dst_reset)
            if sent < n:
                # The destination is congested: hold only what it did not take.
                pending = memoryview(bytes(view[sent:n]))
                while pending:
                    await wait_writable(dst)
                    try:
                        pending = pending[dst.send(pending) :]
                    except BlockingIOError:
                        pass
                    except OSError:
                        abort_on_close(src)
                        raise _Reset(dst_reset)
            if from_client:
                stats.bytes_from_client += n
            else:
                stats.bytes_to_client += n
            state.touch()
            chunks += 1
            if chunks == _CHUNKS_PER_CHECKPOINT:
                chunks = 0
                await checkpoint()


class _State:
    """The idle deadline shared by both directions of one pair."""

    __slots__ = ("idle", "scope")

    def __init__(self, scope: trio.CancelScope, idle: float) -> None:
        self.scope = scope
        self.idle = idle

    def touch(self) -> None:
        if self.idle:
            self.scope.deadline = trio.current_time() + self.idle
