"""Connection tasks kept for the next connection.

Every connection is served by a trio task of its own, in the server's ``connections``
nursery, one connection at a time: the drain cancels it there, its cancel scopes
and timeouts are its own. What a :class:`TaskPool` changes is when that task is made.
A task whose connection has ended parks in the pool instead of exiting, and the next
accepted connection wakes it instead of spawning a new one.

Why: a short connection's task was spawned, parked once (its relay), woken and exited.
Spawning and exiting are most of trio's cost per connection: 67,900 user-space
instructions for that lifecycle against 45,700 for a kept task woken with the next
connection, parked once, woken and parked again in the pool (bench/task_cost.py), of
about 212,000 per connection through the gateway before (bench/README.md: 10 % fewer
with the pool).

What a connection finds, as with a new task:

* **its own context.** The task is given a copy of the accept loop's context when it
  is woken, as trio gives a new task one when it is spawned: a ``contextvars`` value a
  connection set (the OpenTelemetry span made current by ``l4gw_connection_opened``)
  is not the next connection's.
* **its own cancel status.** A kept task parks with no cancel scope of the connection's
  left open, under the nursery's alone; the drain's cancel reaches the parked tasks
  as the running ones, and a parked task ends there.
* **nothing of the last connection held.** The task drops its arguments before it
  parks; an idle task is a trio ``Task`` and one small coroutine frame.

At most ``keep`` tasks wait in the pool (the most connections that ended at once and
are expected back); past that a task ends with its connection, as it did before.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextvars import copy_context
from typing import Any, Final

from outcome import Value
from trio.lowlevel import Abort, Task, current_task, reschedule

from gateway.runloop import Spawn, park

KEEP: Final = 256
"""Tasks a pool keeps parked: above the connections a host's clients open at once in
bursts (wrk's 50, a load balancer's pool), far below the memory that would matter
(about 1.4 KB each, measured with tracemalloc: a ``Task`` and the coroutine frame
of :meth:`TaskPool._serve`)."""


class TaskPool:
    """Runs ``fn(*args)`` in a task of its own for each :meth:`start`, in ``nursery``.

    Args:
        fn: the connection's coroutine function (it handles its own errors: an
            exception it raises ends its task and reaches the nursery, as before).
        nursery: where the tasks live.
        name: each task's name.
        spawn: how a new task is started (gateway/runloop.py :data:`Spawn`).
        keep: the most tasks kept parked.
    """

    __slots__ = ("_fn", "_idle", "_name", "_nursery", "_spawn", "keep")

    def __init__(
        self,
        fn: Callable[..., Awaitable[object]],
        nursery: Any,
        name: str,
        spawn: Spawn,
        keep: int = KEEP,
    ) -> None:
        self._fn = fn
        self._nursery = nursery
        self._name = name
        self._spawn = spawn
        self.keep = keep
        self._idle: list[Task] = []

    @property
    def idle(self) -> int:
        """Tasks parked in the pool now."""
        return len(self._idle)

    def start(self, args: tuple[Any, ...]) -> None:
        """Serve ``fn(*args)`` in a kept task, or a new one when none is parked."""
        idle = self._idle
        if idle:
            task = idle.pop()
            # What spawning gives a task: a copy of the spawner's context.
            task.context = copy_context()
            reschedule(task, Value(args))
        else:
            self._spawn(self._serve, (args,), self._nursery, self._name)

    async def _serve(self, args: tuple[Any, ...] | None) -> None:
        fn = self._fn
        idle = self._idle
        task = current_task()
        abort = functools.partial(self._abort, task)
        while args is not None:
            await fn(*args)
            args = None  # the ended connection's socket and flow are not kept alive
            if len(idle) >= self.keep:
                return
            idle.append(task)
            args = await park(abort)

    def _abort(self, task: Task, _: object) -> Abort:
        # Cancelled while parked (the drain, or the server's end): the task ends. It is
        # not in the pool when start() popped it and was interrupted before waking it.
        if task in self._idle:
            self._idle.remove(task)
        return Abort.SUCCEEDED
