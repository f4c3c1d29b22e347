"""gateway.peers: the slots that keep a worker's last report, and questions between workers
over real socket pairs."""

from __future__ import annotations

import mmap
import os
import socket
import time

import trio

from gateway import peers
from gateway.peers import _HEADER, HALF, Fleet, Link, Slot

HEADER_SIZE = _HEADER.size


def test_slot_keeps_the_last_report_and_survives_a_torn_write():
    memory = mmap.mmap(-1, 2 * HALF)
    slot = Slot(memory, 0)
    assert slot.load() is None
    slot.save({"n": 1})  # the first half
    slot.save({"n": 2})  # the second half
    assert Slot(memory, 0).load() == {"n": 2}  # a new process reads what the last wrote
    # Killed in the middle of the next write, which goes to the first half: its
    # payload is garbage under the old header, and the last report stays readable.
    memory[HEADER_SIZE : HEADER_SIZE + 64] = os.urandom(64)
    assert Slot(memory, 0).load() == {"n": 2}
    again = Slot(memory, 0)  # the process that replaces it counts on
    again.save({"n": 3})
    assert Slot(memory, 0).load() == {"n": 3}
    again.save({"n": 4})
    assert Slot(memory, 0).load() == {"n": 4}


def test_slot_refuses_what_does_not_fit():
    memory = mmap.mmap(-1, 2 * HALF)
    slot = Slot(memory, 0)
    slot.save({"n": 1})
    assert slot.save({"blob": os.urandom(HALF).hex()}) is False
    assert slot.load() == {"n": 1}


def pair() -> tuple[Link, Link, Fleet]:
    """Worker 0 and worker 1 of one fleet, in this process (the fork is the supervisor's)."""
    fleet = Fleet(2)
    sender, receiver = fleet.channels[1]
    receiver.setblocking(False)
    slots = [Slot(fleet.memory, i * 2 * HALF) for i in range(2)]
    zero = Link(0, 2, fleet.started_ns, {1: sender}, None, slots)
    one = Link(1, 2, fleet.started_ns, {}, receiver, slots)
    return zero, one, fleet


async def test_worker_zero_asks_and_the_other_answers():
    zero, one, _ = pair()
    big = [{"id": i, "pad": "x" * 100} for i in range(5000)]  # larger than a socket buffer

    async def flows() -> object:
        return big

    async def slow() -> object:
        await trio.sleep(5)
        return "late"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one.answer, {"flows": flows, "slow": slow})
        answers = await trio.to_thread.run_sync(zero.query, "flows", 5.0)
        assert answers == {1: big}
        started = time.monotonic()
        assert await trio.to_thread.run_sync(zero.query, "slow", 0.3) == {1: None}
        assert time.monotonic() - started < 2
        assert await trio.to_thread.run_sync(zero.query, "unknown", 1.0) == {1: None}
        nursery.cancel_scope.cancel()


async def test_a_worker_that_does_not_run_is_no_answer_and_its_slot_stays():
    zero, one, _ = pair()
    one.save({"metrics": [1]})
    assert await trio.to_thread.run_sync(zero.query, "ready", 0.2) == {1: None}
    assert zero.last(1) == {"metrics": [1]}


def test_a_worker_keeps_only_its_own_ends():
    fleet = Fleet(3)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            link = fleet.link(2)
            others = [s for i, (a, b) in fleet.channels.items() for s in (a, b) if s is not link.receiver]
            code = 0 if link.senders == {} and all(s.fileno() == -1 for s in others) else 3
            peers.install(link)
            code = code or (0 if peers.current() is link else 4)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(s.fileno() != -1 for a, b in fleet.channels.values() for s in (a, b))
    assert all(s.type == socket.SOCK_SEQPACKET for a, _ in fleet.channels.values() for s in (a,))
