"""Bandwidth shaping per connection (``[plugin.ratelimit] bytes_per_second``).

Shaping needs the bytes, so it is a relay: the ratelimit plugin answers
``l4gw_relay`` (tryfirst) with :func:`shaped_relay` when shaping is on, and
a shaped flow stays in userspace (no splice, no sockmap: the kernel tiers
cannot pace). Each direction has its own token bucket of ``bytes_per_second``.

Rules kept here:

* **Read only what may be sent.** A direction reads at most the bytes its
  bucket holds, so nothing piles up in the gateway: the sender is slowed by
  its own TCP window, end to end.
* **The core relay's semantics**: EOF on one side becomes ``shutdown(SHUT_WR)``
  on the other and the other direction goes on; a reset on one side resets
  the other (SO_LINGER 0); ``idle_timeout`` without a byte either way ends
  the pair; the byte counts on the flow are current at every moment.
* **The caller owns the sockets** and closes them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final

import trio
from trio.lowlevel import wait_readable, wait_writable

from gateway import CloseReason, RelayReset, RelayStats, abort_on_close, both_directions

_CHUNK: Final = 16384


class ByteBucket:
    """Bytes allowed per second, with a burst of at most ``burst`` bytes."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def available(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until ``n`` bytes are allowed."""
        return max(0.0, (n - self.available(now)) / self.rate)


def burst_for(rate: int) -> int:
    """A tenth of a second's worth, at least one read's worth (a smaller
    burst would make every read tiny)."""
    return max(_CHUNK, rate // 10)


async def shaped_relay(
    client: socket.socket,
    upstream: socket.socket,
    stats: RelayStats,
    idle_timeout: float,
    bytes_per_second: int,
) -> str:
    """Relay both directions, each paced to ``bytes_per_second``.

    Returns:
        The close reason (a :class:`gateway.CloseReason` value).
    """
    now = trio.current_time()
    burst = burst_for(bytes_per_second)
    first_eof: list[str] = []
    scope = trio.CancelScope()

    def touch() -> None:
        if idle_timeout:
            scope.deadline = trio.current_time() + idle_timeout

    with scope:
        touch()
        reset = await both_directions(
            _pump,
            (
                upstream,
                client,
                stats,
                False,
                ByteBucket(bytes_per_second, burst, now),
                touch,
                first_eof,
            ),
            (
                client,
                upstream,
                stats,
                True,
                ByteBucket(bytes_per_second, burst, now),
                touch,
                first_eof,
            ),
        )
        if reset is not None:
            return reset
    if scope.cancelled_caught:
        return CloseReason.IDLE_TIMEOUT
    return first_eof[0] if first_eof else CloseReason.CLIENT_EOF


async def _pump(
    src: socket.socket,
    dst: socket.socket,
    stats: RelayStats,
    from_client: bool,
    bucket: ByteBucket,
    touch: Callable[[], None],
    first_eof: list[str],
) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    src_reset = CloseReason.CLIENT_RESET if from_client else CloseReason.BACKEND_RESET
    dst_reset = CloseReason.BACKEND_RESET if from_client else CloseReason.CLIENT_RESET
    want = min(_CHUNK, bucket.burst)
    while True:
        await wait_readable(src)
        delay = bucket.wait_for(want, trio.current_time())
        if delay:
            await trio.sleep(delay)
        allowed = min(_CHUNK, int(bucket.available(trio.current_time())))
        try:
            n = src.recv_into(view, allowed)
        except BlockingIOError:
            continue
        except OSError:
            abort_on_close(dst)
            raise RelayReset(src_reset)
        if n == 0:
            first_eof.append(CloseReason.CLIENT_EOF if from_client else CloseReason.BACKEND_EOF)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        bucket.tokens -= n
        pending = view[:n]
        while pending:
            try:
                pending = pending[dst.send(pending) :]
            except BlockingIOError:
                await wait_writable(dst)
            except OSError:
                abort_on_close(src)
                raise RelayReset(dst_reset)
        if from_client:
            stats.bytes_from_client += n
        else:
            stats.bytes_to_client += n
        touch()
