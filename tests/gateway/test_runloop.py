"""gateway/runloop.py: trio's instrument checks in C, with trio's instruments unchanged;
a park one frame lighter than trio's, that behaves as trio's does; the run's own
reschedule and spawn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import outcome
import trio
import trio.lowlevel
from coroutines import awaited_through
from trio._core._run import GLOBAL_RUN_CONTEXT
from trio.testing import wait_all_tasks_blocked

from gateway.runloop import (
    fast_instrument_checks,
    park,
    run_reschedule,
    run_spawn,
    run_wake,
    start_soon,
)


class Steps(trio.abc.Instrument):
    def __init__(self) -> None:
        self.steps = 0
        self.spawned = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_instruments_added_before_and_after_are_still_called() -> None:
    early = Steps()
    trio.lowlevel.add_instrument(early)
    assert fast_instrument_checks()
    assert fast_instrument_checks()  # a second call in the same run changes nothing
    instruments = GLOBAL_RUN_CONTEXT.runner.instruments
    assert type(instruments).__contains__ == instruments.data.__contains__  # in C now
    assert "before_task_step" in instruments and "after_io_wait" not in instruments
    late = Steps()
    trio.lowlevel.add_instrument(late)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.lowlevel.checkpoint)
    await trio.lowlevel.checkpoint()
    assert early.steps > 0 and late.steps > 0 and early.spawned == late.spawned == 1
    trio.lowlevel.remove_instrument(early)
    trio.lowlevel.remove_instrument(late)
    assert "before_task_step" not in instruments and "task_spawned" not in instruments
    steps = late.steps
    await trio.lowlevel.checkpoint()
    assert late.steps == steps  # removed: no longer called


def test_each_run_gets_its_own_checks() -> None:
    """The class made for one run answers from that run's dict, not another's."""

    async def main(add: bool) -> bool:
        assert fast_instrument_checks()
        if add:
            trio.lowlevel.add_instrument(Steps())
        return "before_task_step" in GLOBAL_RUN_CONTEXT.runner.instruments

    assert trio.run(main, True) is True
    assert trio.run(main, False) is False


async def test_park_is_woken_with_what_the_task_is_rescheduled_with() -> None:
    got, frames = await _woken_twice(trio.lowlevel.reschedule, outcome.Value("hello"))
    # One generator between the parked frame and trio (wait_task_rescheduled: two).
    assert frames == ["waiter", "park"]
    assert got[0] == "hello" and isinstance(got[1], KeyError)


async def test_a_parked_task_is_cancelled_through_its_abort_function() -> None:
    aborted: list[object] = []

    def abort(raise_cancel: object) -> trio.lowlevel.Abort:
        aborted.append(raise_cancel)
        return trio.lowlevel.Abort.SUCCEEDED

    with trio.move_on_after(0.01) as scope:
        await park(abort)
    assert scope.cancelled_caught and len(aborted) == 1


def test_run_reschedule_is_the_runs_own_method_and_wakes_as_trios_does() -> None:
    """Outside a run there is no runner: trio's function. Inside, the runner's method,
    which wakes a parked task with a value or an error as trio's function does."""
    assert run_reschedule() is trio.lowlevel.reschedule

    async def main() -> None:
        wake = run_reschedule()
        assert wake == GLOBAL_RUN_CONTEXT.runner.reschedule
        got, _ = await _woken_twice(wake)  # as the poller wakes a pair: with None
        assert got[0] is None and isinstance(got[1], KeyError)

    trio.run(main)


def test_run_wake_wakes_parked_tasks_with_one_outcome_time_after_time() -> None:
    """The poller's wake: the run's own reschedule with one ``Value(None)`` for every
    wakeup, which park never uses up; outside a run, trio's function."""
    assert run_wake() is trio.lowlevel.reschedule

    async def main() -> None:
        wake = run_wake()
        shared = wake.keywords["next_send"]  # type: ignore[attr-defined]
        assert isinstance(shared, outcome.Value) and shared.value is None
        got: list[object] = []
        parked: list[trio.lowlevel.Task] = []

        async def waiter() -> None:
            for _ in range(3):
                parked.append(trio.lowlevel.current_task())
                got.append(await park(lambda _: trio.lowlevel.Abort.FAILED))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            for _ in range(3):
                await wait_all_tasks_blocked()
                wake(parked.pop())
        assert got == [None, None, None]
        assert wake.keywords["next_send"] is shared  # type: ignore[attr-defined]

    trio.run(main)


def test_run_spawn_starts_a_task_in_the_nursery_as_start_soon_does() -> None:
    """Outside a run: the public path. Inside: the runner's method, which starts the
    task in the nursery given, with its arguments and name, as ``start_soon`` does
    (and so does the public path)."""
    assert run_spawn() is start_soon

    async def main() -> None:
        spawn = run_spawn()
        assert spawn == GLOBAL_RUN_CONTEXT.runner.spawn_impl
        ran: list[tuple[str, int, str]] = []

        async def child(word: str, n: int) -> None:
            ran.append((word, n, trio.lowlevel.current_task().name))

        async with trio.open_nursery() as nursery:
            spawn(child, ("fast", 1), nursery, "l4gw.test.fast")
            start_soon(child, ("public", 2), nursery, "l4gw.test.public")
            assert {t.name for t in nursery.child_tasks} == {"l4gw.test.fast", "l4gw.test.public"}
        assert sorted(ran) == [("fast", 1, "l4gw.test.fast"), ("public", 2, "l4gw.test.public")]

    trio.run(main)


async def _woken_twice(wake: Callable[..., None], *first: Any) -> tuple[list[Any], list[str]]:
    """A task parks, is woken by ``wake(task, *first)``, parks again and is woken with a
    KeyError; what it got each time, and the frames it was parked in the first time."""
    got: list[Any] = []
    parked: list[trio.lowlevel.Task] = []

    async def waiter() -> None:
        parked.append(trio.lowlevel.current_task())
        got.append(await park(lambda _: trio.lowlevel.Abort.FAILED))
        parked.append(trio.lowlevel.current_task())
        try:
            await park(lambda _: trio.lowlevel.Abort.FAILED)
        except KeyError as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await wait_all_tasks_blocked()
        task = parked.pop()
        frames = awaited_through(task.coro)
        wake(task, *first)
        await wait_all_tasks_blocked()
        wake(parked.pop(), outcome.Error(KeyError("gone")))
    return got, frames
