"""gateway/relay/idletimer.py: one timer task for the idle deadlines of every pair.

On trio's autojump clock: time passes only while every task sleeps, so "never early,
at most one quantum late" is checked exactly.
"""

from __future__ import annotations

import trio
import trio.testing
from trio.lowlevel import Task, current_task, wait_task_rescheduled

from gateway.relay.idletimer import QUANTUM, IdleTimer
from gateway.relay.poller import current


class Pair:
    def __init__(self) -> None:
        self.task: Task | None = None
        self.expired = False
        self.timer_key = 0


async def expired_at(pair: Pair) -> float:
    """Park like a relay does, until the timer wakes the task; the time it woke."""
    pair.task = current_task()
    await wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
    assert pair.expired
    return trio.current_time()


async def test_a_parked_pair_wakes_never_early_at_most_a_quantum_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer, pair = current().timer, Pair()
    deadline = trio.current_time() + 1.234
    timer.set(pair, deadline)
    woke = await expired_at(pair)
    assert deadline <= woke <= deadline + QUANTUM
    assert pair.timer_key == 0


async def test_a_later_deadline_moves_the_pair_and_an_earlier_one_wakes_the_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer, late, early = current().timer, Pair(), Pair()
    now = trio.current_time()
    timer.set(late, now + 5)
    timer.set(late, now + 30)  # bytes moved: a later deadline
    timer.set(early, now + 2)  # earlier than what the timer sleeps for
    assert now + 2 <= await expired_at(early) <= now + 2 + QUANTUM
    assert not late.expired
    assert now + 30 <= await expired_at(late) <= now + 30 + QUANTUM


async def test_a_cancelled_pair_never_expires_and_leaves_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer, gone, other = IdleTimer(), Pair(), Pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        now = trio.current_time()
        timer.set(gone, now + 1)
        timer.set(other, now + 1)  # the same bucket
        timer.cancel(gone)
        await expired_at(other)
        assert not gone.expired and gone.timer_key == 0
        timer.set(gone, now + 3)
        timer.cancel(gone)
        assert timer._buckets == {}  # an emptied bucket is dropped at once
        await trio.sleep(5)
        assert not gone.expired
        nursery.cancel_scope.cancel()


async def test_a_pair_not_parked_is_only_flagged(autojump_clock: trio.testing.MockClock) -> None:
    timer, pair = current().timer, Pair()
    timer.set(pair, trio.current_time() + 0.5)
    await trio.sleep(1)  # the relay is busy elsewhere: it sees the flag at its next turn
    assert pair.expired and pair.task is None
