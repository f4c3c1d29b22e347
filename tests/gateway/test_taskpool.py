"""gateway/taskpool.py: each connection in a task of its own, tasks kept for the next.

Real trio runs, no mocks: what a connection's coroutine sees (its task, its context,
its cancel status), what a parked task holds, and how the kept tasks end.
"""

from __future__ import annotations

import contextvars
import gc
import weakref
from typing import Any

import pytest
import trio
import trio.testing
from trio.lowlevel import Task, current_task

from gateway.runloop import run_spawn, start_soon
from gateway.taskpool import TaskPool

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("_seen", default="unset")


class _Job:
    """A connection's coroutine that records its task and waits for its release."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.release = trio.Event()

    async def __call__(self, n: int, *_: Any) -> None:
        self.tasks.append(current_task())
        await self.release.wait()


@pytest.mark.parametrize("spawn", [run_spawn, lambda: start_soon], ids=["run_spawn", "start_soon"])
async def test_an_ended_connections_task_serves_the_next(spawn: Any) -> None:
    job = _Job()
    job.release.set()
    async with trio.open_nursery() as nursery:
        pool = TaskPool(job, nursery, "l4gw.test.connection", spawn())
        pool.start((1,))
        await trio.testing.wait_all_tasks_blocked()
        assert pool.idle == 1
        pool.start((2,))
        await trio.testing.wait_all_tasks_blocked()
        assert job.tasks[0] is job.tasks[1]
        assert job.tasks[0].name == "l4gw.test.connection"
        assert len(nursery.child_tasks) == 1
        nursery.cancel_scope.cancel()
    assert pool.idle == 0


async def test_connections_at_once_each_have_a_task_and_keep_bounds_the_parked() -> None:
    job = _Job()
    async with trio.open_nursery() as nursery:
        pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn(), keep=3)
        for n in range(5):
            pool.start((n,))
        await trio.testing.wait_all_tasks_blocked()
        assert len(set(job.tasks)) == 5
        job.release.set()
        await trio.testing.wait_all_tasks_blocked()
        # Three kept, two ended with their connections.
        assert pool.idle == 3
        assert len(nursery.child_tasks) == 3
        for n in range(3):
            pool.start((n,))
        await trio.testing.wait_all_tasks_blocked()
        assert set(job.tasks[5:]) < set(job.tasks[:5])
        nursery.cancel_scope.cancel()


async def test_each_connection_starts_in_a_copy_of_the_starters_context() -> None:
    seen: list[str] = []

    async def job(value: str) -> None:
        seen.append(_seen.get())
        _seen.set(value)

    _seen.set("accept loop")
    async with trio.open_nursery() as nursery:
        pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
        for value in ("first", "second", "third"):
            pool.start((value,))
            await trio.testing.wait_all_tasks_blocked()
        assert pool.idle == 1
        nursery.cancel_scope.cancel()
    # Nothing a connection set reached the next one, or the starter.
    assert seen == ["accept loop"] * 3
    assert _seen.get() == "accept loop"


async def test_a_connection_cancelled_inside_its_own_scope_leaves_the_next_uncancelled() -> None:
    outcomes: list[str] = []
    ended = [trio.Event(), trio.Event()]

    async def job(n: int) -> None:
        with trio.CancelScope() as scope:
            if n == 0:
                scope.cancel()
            await trio.lowlevel.checkpoint()
        outcomes.append("cancelled" if scope.cancelled_caught else "ran")
        # The first connection's deadline passes (a timeout of its own); the second's not.
        with trio.move_on_after(0 if n == 0 else 60) as timeout:
            if n == 0:
                await trio.sleep_forever()
            await trio.lowlevel.checkpoint()
        outcomes.append("timed out" if timeout.cancelled_caught else "in time")
        await trio.lowlevel.checkpoint()
        ended[n].set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
            pool.start((0,))
            await ended[0].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert pool.idle == 1
            pool.start((1,))
            await ended[1].wait()
            nursery.cancel_scope.cancel()
    assert outcomes == ["cancelled", "timed out", "ran", "in time"]


async def test_a_parked_task_holds_nothing_of_its_last_connection() -> None:
    class Sock:
        pass

    async def job(sock: Sock) -> None:
        await trio.lowlevel.checkpoint()

    sock = Sock()
    ref = weakref.ref(sock)
    async with trio.open_nursery() as nursery:
        pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
        pool.start((sock,))
        del sock
        await trio.testing.wait_all_tasks_blocked()
        assert pool.idle == 1
        gc.collect()
        assert ref() is None
        nursery.cancel_scope.cancel()


async def test_the_drains_cancel_ends_the_parked_tasks_and_the_running_ones() -> None:
    job = _Job()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
            for n in range(4):
                pool.start((n,))
            await trio.testing.wait_all_tasks_blocked()
            job.release.set()
            await trio.testing.wait_all_tasks_blocked()
            assert pool.idle == 4
            job.release = trio.Event()  # the next connection waits
            pool.start((9,))
            await trio.testing.wait_all_tasks_blocked()
            assert pool.idle == 3
            nursery.cancel_scope.cancel()
    assert pool.idle == 0
    # A cancelled nursery's tasks end as they park again: nothing waits in the pool.
    async with trio.open_nursery() as nursery:
        pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
        job.release.set()
        pool.start((0,))
        nursery.cancel_scope.cancel()
    assert pool.idle == 0


async def test_a_task_popped_and_never_woken_still_ends_at_the_cancel() -> None:
    # start() interrupted between taking a task and waking it (a KeyboardInterrupt):
    # the task is out of the pool and parked; the cancel must still end it.
    job = _Job()
    job.release.set()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pool = TaskPool(job, nursery, "l4gw.test.connection", run_spawn())
            pool.start((0,))
            await trio.testing.wait_all_tasks_blocked()
            pool._idle.pop()
            assert pool.idle == 0
            nursery.cancel_scope.cancel()


async def test_an_exception_from_a_connection_reaches_the_nursery() -> None:
    async def job() -> None:
        raise ValueError("a bug in the handler")

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="a bug in the handler")):
        async with trio.open_nursery() as nursery:
            TaskPool(job, nursery, "l4gw.test.connection", run_spawn()).start(())
