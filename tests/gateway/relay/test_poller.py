"""The relay poller in trio's own epoll set, and with a set of its own (poller.py rule 4).

Every relay test of test_copy.py and test_splice.py runs both ways (relay_helpers
``poller_set``); these check what the two ways are, and that trio's own waits are
served beside the relays' sockets, with the compiled delivery and the Python one.
"""

from __future__ import annotations

import socket

import pytest
import trio
from trio._core import _run
from trio.lowlevel import current_task, wait_readable

from gateway.relay import poller
from gateway.relay.poller import READABLE, Waiter
from gateway.runloop import park

from relay_helpers import copy_step, poller_set


class _Parked(Waiter):
    """A waiter that counts the events delivered to it while parked."""

    __slots__ = ("serve", "served")

    def __init__(self, serve: bool) -> None:
        super().__init__()
        self.serve = serve
        self.served = 0

    def ready(self) -> bool:
        self.served += 1
        return self.serve


def _io_manager() -> object:
    return _run.GLOBAL_RUN_CONTEXT.runner.io_manager


async def _merged() -> tuple[object, type]:
    """In a trio run: the poller is in trio's epoll set; trio's I/O manager and the
    class it had."""
    io = _io_manager()
    kind = type(io)
    p = poller.current()
    assert p.merged and p._epoll is io._epoll  # type: ignore[attr-defined]
    assert type(io) is not kind and isinstance(io, kind)
    return io, kind


async def test_the_relays_sockets_are_in_trios_own_set() -> None:
    """Merged (the default): the poller registers in trio's epoll set and keeps no
    epoll descriptor of its own."""
    await _merged()


def test_after_the_run_trios_loop_is_the_one_it_was() -> None:
    io, kind = trio.run(_merged)
    assert type(io) is kind


@pytest.mark.usefixtures(poller_set.__name__, copy_step.__name__)
async def test_an_event_wakes_a_parked_owner_or_is_served_where_it_comes(
    poller_set: bool, copy_step: bool
) -> None:
    """Both ways, with either delivery (rule 6): an event for a parked owner is offered
    to its ``ready`` first, which keeps it parked (served) or has it woken, with the
    flag of the side it came on; trio's own wait on another socket of the same run is
    served beside it."""
    p = poller.current()
    assert p.merged is poller_set and p.compiled is copy_step
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        for s in (a, b, c, d):
            s.setblocking(False)
        owner = _Parked(serve=True)
        p.register(a.fileno(), owner, 1)
        trio_saw = trio.Event()

        async def trios_own_wait() -> None:
            await wait_readable(c)
            trio_saw.set()

        async with trio.open_nursery() as n:
            n.start_soon(trios_own_wait)
            with trio.fail_after(5):
                owner.task = current_task()
                # Registering reports what is ready now (writable): served, still parked.
                while owner.served == 0:
                    await trio.sleep(0.001)
                assert owner.task is not None and owner.writable[1]
                d.send(b"x")
                await trio_saw.wait()
                owner.serve = False
                b.send(b"y")
                # Not served this time: the owner is rescheduled, so park to be woken.
                await park(owner.abort)
            assert owner.readable[1] == READABLE and owner.task is None
        p.unregister(a.fileno())
