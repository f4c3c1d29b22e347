"""The relays' events: each socket registered once, edge-triggered, in trio's own epoll set.

trio's own ``wait_readable``/``wait_writable`` register a file descriptor one-shot and
re-arm it at every wait (one ``epoll_ctl`` per wait), and one task can wait on one
descriptor at a time, so a pair needed a task per direction and a nursery. Here a
relay registers its two sockets once, for both directions, and waits in one task for
whichever becomes ready.

Rules kept here:

1. **Registered once, edge-triggered.** ``register`` adds a socket with
   ``EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET``; nothing re-arms it. So a waiter may
   wait for a condition only after the socket said EAGAIN to it (or right after
   ``register``: adding a socket that is already readable reports it): an edge
   that came before would not come again. An owner may ask for other events
   instead: the sockmap tier for a FIN or an error only (still edge-triggered), the
   splice tier one-shot, re-armed with :meth:`Poller.modify` for what it waits for
   each time it parks (a bulk flow's every skb and ACK would otherwise pass through
   this set: gateway/relay/splice.py rule 3).
2. **Readiness is a flag the waiter clears.** An event sets the owner's flags
   (:class:`Waiter` ``readable``/``writable``, indexed by the side registered) and
   wakes it if it is parked (the owner parks with ``waiter.task = current_task()``
   and ``await park(waiter.abort)`` (gateway/runloop.py), in its own frame: a helper
   coroutine would be one more frame that every wakeup passes through); the waiter
   clears a flag when the socket says EAGAIN.
   A flag set for nothing (an edge it did not need) costs one EAGAIN, never a hang.
   Before waking a parked owner the poller asks it (:meth:`Waiter.ready`) whether the
   event can be served right here, synchronously: a copy pair moves the bytes of a
   plain request or response that way, and its task is woken only for what needs it
   (an end, a reset, a promotion). Two task switches per message were a third of
   the copy tier's CPU per keepalive request.
3. **A registration ends with the socket.** ``forget`` drops the owner (events for a
   descriptor nobody owns are ignored: an edge that raced a close); ``unregister``
   also removes it from the set, for a socket that lives on (a kernel tier takes it).
   Closing the socket removes it from the set in the kernel.
4. **In trio's own epoll set, delivered by trio's own wait.** The relays' sockets are
   registered in the set trio's run loop waits in, and the events trio's wait returns
   for them are delivered here (:meth:`Poller.deliver`) before trio sees the rest, in
   the same pass of its loop. With a set of its own, each wakeup of the relays took
   trio's wait on that set's descriptor, its re-arming (``epoll_ctl``), a wait on the
   set itself and a switch to the task that read it: on a keepalive load about one
   wakeup per one or two requests (bench/README.md). trio's wait is also asked for
   up to :data:`_BATCH` events more than trio's own waits, which are few. This reaches
   into trio's loop (gateway/runloop.py ``share_epoll``); where that loop is not the
   one known there, the poller keeps a set of its own and a system task that waits on
   it and delivers (:data:`MERGE` set False makes one so too).
   A socket that is a relay's must not be waited on with trio's ``wait_*`` until it is
   ``unregister``-ed: trio would re-arm it one-shot, for itself.
5. **One system task per trio run** holds the poller's life: it ends with the run, and
   the poller with it (trio's loop as it was, or its own set closed). A second one
   runs the relays' idle timer (:attr:`Poller.timer`, gateway/relay/idletimer.py).
   The run's pool of pipes for the splice tier (:attr:`Poller.pipes`,
   gateway/relay/pipes.py) is closed with the poller.
6. **The delivery is compiled where it can be.** Where gateway/relay/_copystep.c is
   built, :meth:`Poller.deliver` runs as its ``deliver``: the same loop, and for an
   owner that keeps a fast path (:attr:`Waiter.fast`: a parked copy pair holding
   nothing) an event's bytes are moved there, and a direction ended, with no Python
   call (gateway/relay/copy.py rule 8). The interpreter's part of a kept-alive
   request through the copy tier was four calls and about a hundred bytecodes around
   one read and one write (bench/README.md, "The delivery compiled"). There, trio's
   wait (rule 4) is ``_copystep.wait``, which delivers as it waits: the events come
   packed as the kernel returns them, only the ones left to trio become (fd, events)
   tuples, and when every event was served with no call into Python it waits again
   itself for the rest of trio's timeout, where trio's loop would have come round to
   do it (nothing it waits for can have changed). The owners' attributes are read and
   written by slot (bench/README.md, "Attributes by slot, trio's wait compiled").
   :data:`COMPILED` says which delivery a new poller takes.
"""

from __future__ import annotations

import errno
import select
from collections.abc import Callable
from functools import partial
from time import perf_counter
from typing import Final

from trio import sleep_forever
from trio.lowlevel import (
    Abort,
    RunVar,
    Task,
    spawn_system_task,
    wait_readable,
)

from gateway.relay.idletimer import IdleTimer
from gateway.relay.pipes import PipePool
from gateway.runloop import Events, run_wake, share_epoll, unshare_epoll

try:
    from gateway.relay import _copystep
except ImportError:  # not built (gateway/relay/copy.py says why, at start)
    _copystep = None  # type: ignore[assignment]

_EVENTS: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_BATCH: Final = 256
_READ: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_ENDS: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

READABLE: Final = 1
"""``Waiter.readable[side]``: an event said there are bytes to read."""
READABLE_TO_END: Final = 2
"""``Waiter.readable[side]``: an event said the peer's FIN (or an error) is queued too:
read on to it, since no later edge will come for what is already there."""
_WRITE: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

FastPath = tuple[int, int, bytearray, object, float, float, int, int, int, float, object]
"""A copy pair's fast path (rule 6; gateway/relay/copy.py rule 8): the descriptors of
side 0 and side 1, the scratch buffer, the stats, the idle timeout, the run clock's
offset, the chunk budget, the sides whose direction ended (a mask of ``1 << side``),
the promotion's byte count and time on the run clock (-1 and 0.0: none to come), and
the flow whose span gets a "half_closed" event (the stats when they are a flow, else
None)."""


class Waiter:
    """What one relay waits for: two sides (0 and 1), each readable and/or writable."""

    __slots__ = ("fast", "readable", "task", "writable")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.readable = [0, 0]
        """Per side: 0, :data:`READABLE` or :data:`READABLE_TO_END`."""
        self.writable = [False, False]
        self.fast: FastPath | None = None
        """A copy pair's fast path, while the compiled delivery may serve its events
        (rule 6; gateway/relay/copy.py rule 8); None for every other owner."""

    def ready(self) -> bool:
        """Called by the poller, with the flags set, when an event came while the owner
        is parked: True when it was served here and the owner stays parked. It runs
        inside trio's run loop (rule 4), in no task, so it must not wait, and an
        exception it lets out would end the trio run: keep it for the owner. The
        default wakes the owner."""
        return False

    def abort(self, _: object) -> Abort:
        """Cancelled while parked (a bound method, not a closure per wait: an idle
        pair is parked for its whole idle life)."""
        self.task = None
        return Abort.SUCCEEDED


class Poller:
    """The relays' events in one trio run (:func:`current`)."""

    def __init__(self, merge: bool = True, compiled: bool = False) -> None:
        self._owners: dict[int, tuple[Waiter, int]] = {}
        self.compiled = compiled and _copystep is not None
        """Whether events are delivered by the compiled delivery (rule 6)."""
        # Both deliveries run in trio's loop or the poller's system task: protected
        # from a KeyboardInterrupt already, so trio's reschedule without its wrapper;
        # and every owner parks in runloop.park (rule 2), so one outcome for them all.
        self._reschedule = run_wake()
        self._deliver: Callable[[Events], Events | None] = self.deliver
        if self.compiled:
            # Rule 6: the same delivery, in C, bound to this poller's owners.
            self._deliver = partial(_copystep.deliver, self._owners, self._reschedule, perf_counter)
        # Compiled, trio's wait is the delivery's too (rule 6: _copystep.wait).
        wait = (
            partial(_copystep.wait, self._owners, self._reschedule, perf_counter)
            if self.compiled
            else None
        )
        trios = share_epoll(self._deliver, _BATCH, wait) if merge else None
        self.merged = trios is not None
        """Whether the relays' sockets are in trio's own epoll set (rule 4)."""
        self._epoll = trios if trios is not None else select.epoll()
        self.alive = True
        """False once its trio run ended (trio's loop given back, or its own set closed)."""
        self.timer = IdleTimer()
        """The relays' idle deadlines (gateway/relay/idletimer.py), run beside the set."""
        self.pipes = PipePool()
        """The splice tier's pipes, lent while bytes are in them (gateway/relay/pipes.py)."""

    def register(self, fd: int, waiter: Waiter, side: int, events: int = _EVENTS) -> None:
        """Watch ``fd`` for ``waiter`` as its side ``side`` (0 or 1).

        ``events`` is for an owner that wants fewer wakeups than every edge (rule 1):
        the sockmap tier (a FIN or an error only, edge-triggered, until it has bytes
        of its own to move), the splice tier (``EPOLLONESHOT``, re-armed as it parks).
        """
        self._owners[fd] = (waiter, side)
        try:
            self._epoll.register(fd, events)
        except FileExistsError:
            # Still in the set from an earlier relay of the same socket that ended
            # without unregistering: re-arming it reports what is ready now.
            self._epoll.modify(fd, events)

    def modify(self, fd: int, events: int) -> None:
        """Watch a registered ``fd`` for ``events`` from now on; what is ready now is
        reported again (an edge for each)."""
        self._epoll.modify(fd, events)

    def forget(self, fd: int) -> None:
        """Stop waking anyone for ``fd``; the socket is about to be closed."""
        self._owners.pop(fd, None)

    def unregister(self, fd: int) -> None:
        """Take ``fd`` out of the set (the socket lives on elsewhere)."""
        self._owners.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBADF):
                raise

    def deliver(self, events: Events) -> Events | None:
        """Set the owners' flags for ``events`` and wake each owner that
        :meth:`Waiter.ready` did not serve; the events of descriptors it does not own,
        for trio (None when there are none). The compiled delivery (rule 6) does the
        same, and serves a copy pair's event itself where it can."""
        owners = self._owners
        theirs = None
        for fd, events_ in events:
            owner = owners.get(fd)
            if owner is None:
                if theirs is None:
                    theirs = [(fd, events_)]
                else:
                    theirs.append((fd, events_))
                continue
            waiter, side = owner
            if events_ & _READ:
                waiter.readable[side] = READABLE_TO_END if events_ & _ENDS else READABLE
            if events_ & _WRITE:
                waiter.writable[side] = True
            task = waiter.task
            if task is not None and not waiter.ready():
                waiter.task = None
                self._reschedule(task)
        return theirs

    async def run(self) -> None:
        epoll = self._epoll
        try:
            if self.merged:
                # trio's own wait delivers the events (rule 4): nothing to poll here.
                await sleep_forever()
            while True:
                await wait_readable(epoll.fileno())
                # A bounded batch: without maxevents CPython sizes a buffer for the
                # whole set at every wakeup; what is left keeps the epoll fd readable.
                self._deliver(epoll.poll(0, _BATCH))
        finally:
            self.alive = False
            self._owners.clear()
            if self.merged:
                unshare_epoll()
            else:
                epoll.close()
            self.pipes.close()


_CURRENT: RunVar[Poller] = RunVar("l4gw_relay_poller")


def running() -> Poller | None:
    """This trio run's poller if it started; None before, or outside a trio run."""
    try:
        return _CURRENT.get()
    except (LookupError, RuntimeError):
        return None


MERGE = True
"""Whether a run's poller puts the relays' sockets in trio's own epoll set (rule 4);
False gives it a set of its own (the relay tests run both ways)."""
COMPILED = _copystep is not None
"""Whether a run's poller delivers events with the compiled delivery (rule 6); the
tests set it False to run the Python one where the module is built."""


def current() -> Poller:
    """This trio run's poller, started on first use."""
    try:
        return _CURRENT.get()
    except LookupError:
        poller = Poller(MERGE, COMPILED)
        _CURRENT.set(poller)
        spawn_system_task(poller.run, name="l4gw relay poller")
        spawn_system_task(poller.timer.run, name="l4gw relay idle timer")
        return poller
