"""The copy relay's idle deadlines: one timer task for every pair of the process.

A trio cancel scope with a deadline per pair cost ~6 µs of CPU per connection to make,
enter and leave (more than the rest of the relay's setup), and moving its deadline
re-sorts trio's deadline heap. Here a pair's deadline is a number in a bucket, and one
system task sleeps until the earliest bucket is due.

Rules kept here:

1. **Buckets of :data:`QUANTUM` seconds**, keyed by the deadline rounded *up*: a pair
   is never cut early, and at most ``QUANTUM`` (plus the wakeup) late. A deadline
   moves bucket only when it changes bucket; the copy relay moves it rarely (only once
   it fell behind "now + idle", with slack: gateway/relay/copy.py, ``_moved``).
2. **What closes, leaves.** A pair is taken out of its bucket when its relay ends
   (:meth:`IdleTimer.cancel`), and an emptied bucket is dropped at once, so the timer
   holds exactly the pairs being relayed. Bucket keys left in the heap by dropped
   buckets are skipped when they come up.
3. **Expiry wakes, it does not cancel.** A due pair gets ``expired = True`` and, if its
   task is parked in the poller, the task is rescheduled; the relay sees the flag at
   its next turn and ends the pair as idle. Nothing is raised into the task, so
   cancellation from outside (the drain) keeps its own meaning.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Final, Protocol

import trio
from trio.lowlevel import Task, reschedule

try:  # where trio 0.35 keeps its own clock's class; without it, every clock is called
    from trio._core._run import SystemClock as _SystemClock

    _SYSTEM_CLOCK: type | None = _SystemClock
except ImportError:  # pragma: no cover - another trio
    _SYSTEM_CLOCK = None

QUANTUM: Final = 0.01
"""Seconds per bucket: how late past its deadline an idle pair may close."""
SLACK: Final = 1 + 1 / 64
"""A relay sets a pair's deadline to ``now + idle * SLACK`` and moves it only once it
has fallen behind ``now + idle`` (rule 1): an idle pair closes between ``idle`` and
``idle * SLACK`` (+ the quantum) after its last byte, never early."""


class Timed(Protocol):
    """What the timer needs of a pair (gateway/relay/copy.py ``_Pair``)."""

    task: Task | None
    expired: bool
    timer_key: int


class IdleTimer:
    """The process's idle deadlines (its poller's: ``gateway.relay.poller.current().timer``)."""

    def __init__(self) -> None:
        """Make it inside the trio run whose clock it keeps."""
        clock = trio.lowlevel.current_clock()
        self.now: Callable[[], float] = clock.current_time
        """``trio.current_time()`` without its two calls on the way to the clock."""
        self.offset: float | None = (
            getattr(clock, "offset", None) if type(clock) is _SYSTEM_CLOCK else None
        )
        """With trio's own clock (``offset + time.perf_counter()``, fixed for the run):
        its offset, so that the copy relay, which reads the clock per chunk, reads it
        without a Python call. None with any other clock (a test's ``MockClock``):
        then :attr:`now` it is."""
        self._buckets: dict[int, set[Timed]] = {}
        self._keys: list[int] = []
        """Bucket keys, a heap; may hold keys of buckets dropped since (rule 2)."""
        self._sleep: trio.CancelScope | None = None
        """The timer task's sleep, while it sleeps (its deadline: the next bucket)."""

    def set(self, pair: Timed, deadline: float) -> None:
        """Expire ``pair`` once ``trio.current_time()`` passes ``deadline``."""
        key = math.ceil(deadline / QUANTUM)
        old = pair.timer_key
        if key == old:
            return
        if old:
            self.cancel(pair)  # out of its old bucket (a rare move: copy.py, _moved)
        pair.timer_key = key
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._keys, key)
            sleep = self._sleep
            if sleep is not None and key * QUANTUM < sleep.deadline:
                sleep.deadline = key * QUANTUM
        bucket.add(pair)

    def cancel(self, pair: Timed) -> None:
        """``pair`` no longer expires (its relay ended)."""
        key = pair.timer_key
        if key:
            pair.timer_key = 0
            bucket = self._buckets.get(key)
            if bucket is not None:
                bucket.discard(pair)
                if not bucket:
                    del self._buckets[key]

    def _expire_due(self, now: float) -> float:
        """Expire every bucket due at ``now``; when the next one is due."""
        keys, buckets = self._keys, self._buckets
        while keys:
            key = keys[0]
            bucket = buckets.get(key)
            if bucket is None:  # dropped (rule 2)
                heapq.heappop(keys)
                continue
            if key * QUANTUM > now:
                return key * QUANTUM
            heapq.heappop(keys)
            del buckets[key]
            for pair in bucket:
                pair.timer_key = 0
                pair.expired = True
                task = pair.task
                if task is not None:
                    pair.task = None
                    reschedule(task)
        return math.inf

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._expire_due(self.now())) as sleep:
                self._sleep = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    self._sleep = None
