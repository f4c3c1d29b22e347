"""Trio's run loop, spared a Python call per check of its instruments; a parked task,
one coroutine; a task spawned and woken without trio's wrappers; trio's epoll set
shared with the relays. Every reach into trio's private modules is here.

Around every task step, spawn, reschedule and exit, trio asks whether an
instrument wants that event: ``"before_task_step" in runner.instruments``. Its
``Instruments`` is a ``collections.UserDict`` (trio 0.35), whose ``__contains__``
is a Python function: 8.4 calls per new connection through the gateway, 3,700
of its 272,000 user-space instructions (bench/README.md), for a check whose answer is
"no" unless an instrument is installed.

:func:`fast_instrument_checks` gives the current run's ``Instruments`` a class of
its own whose ``__contains__`` is the C method of the dict the instruments live
in. Nothing else changes: the object, its dict and its methods are the same, so
``trio.lowlevel.add_instrument``/``remove_instrument`` and every installed
instrument work as before (tests/gateway/test_runloop.py). Where trio's
instruments are not the object described here (another trio), it does nothing.

:func:`park` is ``trio.lowlevel.wait_task_rescheduled`` without its coroutine:
trio's is a coroutine that awaits a generator that yields the trap's message, so a
parked task held both (about 280 bytes more than one generator) and each wakeup
passed through both. A wakeup with a value returns it without ``outcome``'s two
Python calls to unwrap it. A relay parks for the whole idle life of a flow. Where trio
has no such message (another trio), :func:`park` is trio's own.

:func:`run_spawn` and :func:`run_reschedule` are the run's own methods that
``Nursery.start_soon`` and ``trio.lowlevel.reschedule`` call, for the connection
tasks (spawned when no kept one waits: gateway/taskpool.py) and the relay poller (a
wakeup per short connection): a Python call less each. Where trio's are not the ones
known here (or there is no run), they are the public functions. :func:`run_wake`, the
poller's, also wakes every task parked in :func:`park` with one shared outcome.

:func:`share_epoll` lets another owner of descriptors (the relay poller,
gateway/relay/poller.py rule 4) register them in the epoll set trio's loop waits in
and have their events first, in the same pass of the loop: trio's I/O manager gets a
class of its own whose ``process_events`` hands the owner the events and trio what the
owner leaves, and whose ``get_events`` asks for a batch the size of the owner's too
(trio sizes it by its own waits); or whose wait is the owner's, which delivers as it
waits (the compiled delivery's: events taken packed, not a tuple each, and served
without trio's loop coming round when no Python had to run). :func:`unshare_epoll`
gives the class back. Where trio's I/O manager is not trio 0.35's ``EpollIOManager``,
nothing is shared.
"""

from __future__ import annotations

import inspect
import logging
import select
import types
from collections.abc import Awaitable, Callable, Generator
from functools import partial
from typing import Any, cast

from outcome import Value
from trio._core import _run
from trio._core._instrumentation import Instruments
from trio.lowlevel import Abort, Task, reschedule, wait_task_rescheduled

try:  # where trio 0.35 keeps its epoll loop
    from trio._core._io_epoll import EpollIOManager

    _TrioEpoll: Any = EpollIOManager
except ImportError:  # pragma: no cover - another trio, or not Linux
    _TrioEpoll = None

log = logging.getLogger("l4gw.runloop")

Events = list[tuple[int, int]]
"""What an epoll wait returns: (descriptor, events) pairs."""


def fast_instrument_checks() -> bool:
    """Call inside ``trio.run``; whether the checks of this run got faster."""
    runner = _run.GLOBAL_RUN_CONTEXT.runner
    instruments = getattr(runner, "instruments", None)
    data = getattr(instruments, "data", None)
    if type(data) is not dict:
        log.debug("trio's instruments keep no dict here: left as they are")
        return False
    kind: Any = type(instruments)
    if kind.__contains__ == data.__contains__:
        return True  # done already in this run
    if kind is not Instruments:
        log.debug("trio's instruments are not its UserDict here: left as they are")
        return False
    # A bound builtin method is no descriptor: as a class attribute it is called
    # with the key alone, so ``key in instruments`` is ``key in data``, in C.
    fast = type("Instruments", (Instruments,), {"__slots__": (), "__contains__": data.__contains__})
    instruments.__class__ = fast
    return True


def _trap() -> Callable[[Callable[[Any], Abort]], Awaitable[Any]]:
    try:
        from trio._core._traps import WaitTaskRescheduled
    except ImportError:
        log.debug("trio has no WaitTaskRescheduled here: park is wait_task_rescheduled")
        return wait_task_rescheduled

    @types.coroutine
    def park(abort_func: Callable[[Any], Abort]) -> Generator[Any, Any, Any]:
        # What trio's wait_task_rescheduled yields (through one more coroutine): the
        # message, answered with the outcome trio reschedules the task with.
        woken = yield WaitTaskRescheduled(abort_func)
        if woken.__class__ is Value:
            # What its unwrap() returns, without its two calls: the flag they set
            # guards against a second unwrap, and no one else holds this outcome.
            return woken.value
        return woken.unwrap()

    return park


park = _trap()
"""``await park(abort_func)``: as ``trio.lowlevel.wait_task_rescheduled(abort_func)``,
one frame lighter (the module's docstring)."""


def run_wake() -> Callable[[Task], None]:
    """Call inside ``trio.run``: :func:`run_reschedule` for tasks parked in :func:`park`
    alone, which wakes each with the same ``Value(None)``, not one made per wakeup (an
    attrs ``__init__``, a Python call, per short connection's relay).

    Only :func:`park` may be woken so: it reads the value without ``unwrap()``, whose
    flag would make the shared outcome fail its next wakeup. Where :func:`park` is
    trio's own (it unwraps), each wakeup gets its own, as from :func:`run_reschedule`.
    """
    method = run_reschedule()
    if park is wait_task_rescheduled or method is reschedule:
        return method
    runners: Any = method  # the runner's own, which takes next_send by name
    return partial(runners, next_send=_WOKEN)


_WOKEN = Value(None)


def run_reschedule() -> Callable[[Task], None]:
    """Call inside ``trio.run``: what ``trio.lowlevel.reschedule`` calls, this run's own
    method, without the call of its wrapper; trio's function where there is no run.

    The wrapper protects the reschedule from a KeyboardInterrupt raised inside it
    (trio's KI handling). Only for callers that are protected already: code run by
    trio's own loop (the I/O manager's events, :func:`share_epoll`) or by a system
    task, as the relay poller's delivery is.
    """
    method = getattr(getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None), "reschedule", None)
    return method if callable(method) else reschedule


Spawn = Callable[[Callable[..., Awaitable[object]], tuple[Any, ...], Any, str], object]
"""``spawn(async_fn, args, nursery, name)``: ``nursery.start_soon(async_fn, *args,
name=name)``."""


def start_soon(
    async_fn: Callable[..., Awaitable[object]], args: tuple[Any, ...], nursery: Any, name: str
) -> None:
    """A :data:`Spawn` through the nursery's public method."""
    nursery.start_soon(async_fn, *args, name=name)


def run_spawn() -> Spawn:
    """Call inside ``trio.run``: what ``Nursery.start_soon`` calls, this run's own
    method, without the call of ``start_soon`` (one per connection); :func:`start_soon`
    outside a run, or where trio's method is not the one known here."""
    method: Any = getattr(getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None), "spawn_impl", None)
    if method is None:
        return start_soon
    try:
        names = list(inspect.signature(method).parameters)[:4]
    except (TypeError, ValueError):
        names = []
    if names != ["async_fn", "args", "nursery", "name"]:
        log.debug("trio's spawn_impl is not trio 0.35's here: connections use start_soon")
        return start_soon
    return cast(Spawn, method)


def share_epoll(
    deliver: Callable[[Events], Events | None],
    batch: int,
    wait: Callable[[int, float, int], Events | bool] | None = None,
) -> select.epoll | None:
    """Call inside ``trio.run``: trio's epoll set, whose events ``deliver`` gets first
    from now on (returning the ones it does not own, or None), with ``batch`` more
    events asked of each wait; None where trio's loop is not the one known here.

    ``wait(epfd, timeout, maxevents)``, when given, is trio's wait and the delivery in
    one (the compiled delivery's, gateway/relay/_copystep.c ``wait``): it returns
    trio's events (empty: the timeout passed), or True when only the owner's came,
    and ``deliver`` is not called. Not in guest mode, where trio waits in a thread of
    its own and the delivery must run in the run's thread.
    """
    runner = getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None)
    io = getattr(runner, "io_manager", None)
    base: Any = _TrioEpoll
    if base is None:
        return None
    process = base.process_events
    epoll = getattr(io, "_epoll", None)
    if type(io) is not base or not isinstance(epoll, select.epoll):
        return None

    if wait is None or getattr(runner, "is_guest", True):

        def get_events(self: Any, timeout: float) -> Any:
            return epoll.poll(timeout, batch + len(self._registered))

        def process_events(self: Any, events: Any) -> None:
            theirs = deliver(events)
            if theirs is not None:
                process(self, theirs)

    else:
        epfd = epoll.fileno()

        def get_events(self: Any, timeout: float) -> Any:
            return wait(epfd, timeout, batch + len(self._registered))

        def process_events(self: Any, events: Any) -> None:
            if events is not True:
                process(self, events)

    io.__class__ = type(
        "EpollIOManager",
        (base,),
        {"__slots__": (), "get_events": get_events, "process_events": process_events},
    )
    return epoll


def unshare_epoll() -> None:
    """Call inside the ``trio.run`` that :func:`share_epoll` was: trio's loop as it was."""
    io = getattr(getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None), "io_manager", None)
    if io is not None and _TrioEpoll is not None and isinstance(io, _TrioEpoll):
        io.__class__ = _TrioEpoll
