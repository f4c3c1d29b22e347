"""The compiled copy loop (gateway/relay/_copystep.c) on real sockets: every way it
stops, the bytes it moves and the ones it leaves, and its argument checks; and the
compiled delivery: the owners' flags, who it wakes, what it hands back, and a copy
pair's fast path (what it moves itself and what it hands to Python); the owners'
attributes read by slot, and trio's wait that delivers as it waits; the accept loop's
accept."""

from __future__ import annotations

import errno
import fcntl
import math
import os
import select
import signal
import socket
import struct
import termios
import threading
import time

import pytest

from relay_helpers import payload, require_compiled_copy_step

require_compiled_copy_step()

from gateway.relay import _copystep as step  # noqa: E402  (after the check above)
from gateway.relay.poller import Waiter  # noqa: E402
from gateway.relay.stats import RelayStats  # noqa: E402

NO_LIMIT = 0


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@pytest.fixture
def pairs():
    """src_peer → src (read by move) and dst → dst_peer (written by move)."""
    src_peer, src = _tcp_pair()
    dst, dst_peer = _tcp_pair()
    yield src_peer, src, dst, dst_peer
    for s in (src_peer, src, dst, dst_peer):
        s.close()


def _drain(sock: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not chunk:
            return bytes(got)
        got += chunk


def _feed(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(True)
    sock.sendall(data)
    sock.setblocking(False)


def _settle(sock: socket.socket, n: int) -> None:
    """Wait until ``sock`` has ``n`` bytes queued to read (loopback delivers at once,
    but the test should not depend on it)."""
    for _ in range(1000):
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        if queued >= n:
            return
        time.sleep(0.001)
    raise AssertionError(f"only {queued} of {n} bytes arrived")


def test_nothing_to_read_is_drained(pairs):
    _, src, dst, _ = pairs
    assert step.move(bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT) == (
        step.DRAINED,
        0,
        0,
        0,
        0,
    )


@pytest.mark.parametrize(
    ("stop_short", "status"),
    [(True, step.SHORT), (False, step.DRAINED)],
    ids=["a-short-read-stops-it", "else-it-reads-to-eagain"],
)
def test_one_short_chunk_moves_exactly(pairs, stop_short, status):
    src_peer, src, dst, dst_peer = pairs
    data = payload(1000, 1)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(4096), src.fileno(), dst.fileno(), 16, stop_short, NO_LIMIT)
    assert out == (status, 1000, 1, 0, 0)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data


def test_the_budget_stops_it_and_the_rest_waits_in_the_source(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(100, 3)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 3, True, NO_LIMIT)
    assert out == (step.BUDGET, 48, 3, 0, 0)
    _settle(dst_peer, 48)
    assert _drain(dst_peer) == data[:48]
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 16, True, NO_LIMIT)
    assert out == (step.SHORT, 52, 4, 0, 0)  # 16 + 16 + 16 + 4: the last one short
    _settle(dst_peer, 52)
    assert _drain(dst_peer) == data[48:]


def test_the_limit_stops_it_at_the_chunk_that_reaches_it(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(100, 4)
    _feed(src_peer, data)
    _settle(src, len(data))
    out = step.move(bytearray(16), src.fileno(), dst.fileno(), 16, True, 20)
    assert out == (step.LIMIT, 32, 2, 0, 0)
    _settle(dst_peer, 32)
    assert _drain(dst_peer) == data[:32]


def test_an_end_after_bytes_moves_them_first(pairs):
    src_peer, src, dst, dst_peer = pairs
    data = payload(300, 5)
    _feed(src_peer, data)
    src_peer.shutdown(socket.SHUT_WR)
    _settle(src, len(data))
    out = step.move(bytearray(128), src.fileno(), dst.fileno(), 16, False, NO_LIMIT)
    assert out == (step.END, 300, 3, 0, 0)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data


def test_a_congested_destination_leaves_the_rest_of_the_chunk_held(pairs):
    src_peer, src, dst, dst_peer = pairs
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    scratch = bytearray(65536)
    data = payload(4 << 20, 6)
    fed = written = 0
    while True:
        # Feed what the source's queue takes; the destination's peer reads nothing.
        try:
            fed += src_peer.send(data[fed : fed + 65536])
        except BlockingIOError:
            pass
        status, moved, chunks, sent, held = step.move(
            scratch, src.fileno(), dst.fileno(), 16, False, NO_LIMIT
        )
        written += moved
        if status == step.HELD:
            break
        assert status in (step.DRAINED, step.BUDGET), status
        assert fed < len(data), "the destination never pushed back"
    assert 0 <= sent < held <= len(scratch)
    assert moved <= chunks * len(scratch)  # whole chunks only: the held one is not in it
    # The whole chunks and the taken part of the held one reach the peer; the rest is
    # the caller's to keep. All of it, in order, is the source's stream so far.
    written += sent
    dst_peer.settimeout(10)
    got = bytearray()
    while len(got) < written:
        got += dst_peer.recv(written - len(got))
    got += scratch[sent:held]
    assert bytes(got) == data[: len(got)]


def test_a_reset_source_is_a_source_error(pairs):
    src_peer, src, dst, _ = pairs
    src_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    src_peer.close()
    for _ in range(1000):
        out = step.move(bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT)
        if out[0] != step.DRAINED:
            break
    assert out == (step.SRC_ERROR, 0, 0, errno.ECONNRESET, 0)


def test_a_gone_destination_is_a_destination_error(pairs):
    src_peer, src, dst, dst_peer = pairs
    dst_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    dst_peer.close()
    data = payload(100, 7)
    _feed(src_peer, data)
    _settle(src, len(data))
    status, moved, chunks, err, _ = step.move(
        bytearray(64), src.fileno(), dst.fileno(), 16, True, NO_LIMIT
    )
    assert (status, moved, chunks) == (step.DST_ERROR, 0, 0)
    assert err in (errno.ECONNRESET, errno.EPIPE)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((bytearray(8), 0, 1, 16, True), TypeError),  # five arguments
        ((bytearray(8), -1, 1, 16, True, 0), ValueError),
        ((bytearray(8), 0, 1, 0, True, 0), ValueError),  # no budget
        ((bytearray(0), 0, 1, 16, True, 0), ValueError),  # nowhere to read into
        ((b"read-only", 0, 1, 16, True, 0), BufferError),
        ((bytearray(8), "0", 1, 16, True, 0), TypeError),
    ],
)
def test_bad_arguments_are_errors_not_crashes(args, error):
    with pytest.raises(error):
        step.move(*args)


# The compiled delivery (gateway/relay/poller.py rule 6, copy.py rule 8). Sides as in
# copy.py: 1 the client's socket (``src`` here), 0 the upstream's (``dst``).
CLIENT, UPSTREAM = 1, 0
IN, OUT = select.EPOLLIN, select.EPOLLOUT


class _Direction:
    """A copy pair's direction as the delivery sees it: whether it is over."""

    def __init__(self) -> None:
        self.done = False


class _Owner(Waiter):
    """A waiter that records what the delivery asked of it, with the fields of a copy
    pair that the fast path ends a direction in (copy.py ``_Pair``)."""

    __slots__ = (
        "c2u",
        "calls",
        "deadline",
        "error",
        "fastpath",
        "first_eof",
        "promoting",
        "serves",
        "u2c",
    )

    def __init__(self, parked: bool, serves: bool = True) -> None:
        super().__init__()
        self.error: Exception | None = None
        self.task = "the task" if parked else None  # type: ignore[assignment]
        self.calls: list[tuple[object, ...]] = []
        self.serves = serves
        self.deadline = math.inf
        self.c2u, self.u2c = _Direction(), _Direction()
        self.first_eof: str | None = None
        self.promoting = True
        self.fastpath: object = None

    def ready(self, *moved: int) -> bool:
        self.calls.append(("ready", *moved))
        return self.serves


class _Flow(RelayStats):
    """Stats that are a flow: the events the fast path adds to its span."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, dict[str, object]]] = []

    def add_event(self, name: str, **attributes: object) -> None:
        self.events.append((name, attributes))


def _deliver(owners, events):  # type: ignore[no-untyped-def]
    woken: list[object] = []
    theirs = step.deliver(owners, woken.append, time.perf_counter, events)
    return theirs, woken


def _fast(src, dst, stats, idle=0.0, scratch=65536, ended=0):  # type: ignore[no-untyped-def]
    flow = stats if isinstance(stats, _Flow) else None
    return (
        dst.fileno(), src.fileno(), bytearray(scratch), stats, idle, 0.0, 16, ended, -1, 0.0, flow
    )  # fmt: skip


def test_deliver_sets_flags_and_hands_back_what_it_does_not_own():
    idle, parked = _Owner(parked=False), _Owner(parked=True)
    owners = {10: (idle, CLIENT), 11: (parked, UPSTREAM)}
    events = [(9, IN), (10, IN | select.EPOLLRDHUP), (11, OUT), (12, IN)]
    theirs, woken = _deliver(owners, events)
    assert theirs == [(9, IN), (12, IN)]
    assert idle.readable == [0, 2] and idle.calls == []  # READABLE_TO_END; not parked
    assert parked.writable == [True, False] and parked.calls == [("ready",)]
    assert woken == []
    assert _deliver(owners, [(10, IN)])[0] is None


def test_deliver_wakes_a_parked_owner_its_ready_did_not_serve():
    owner = _Owner(parked=True, serves=False)
    theirs, woken = _deliver({5: (owner, CLIENT)}, [(5, IN)])
    assert (theirs, woken, owner.task, owner.readable) == (None, ["the task"], None, [0, 1])


def test_a_plain_event_of_a_fast_owner_is_moved_and_counted_without_python(pairs):
    src_peer, src, dst, dst_peer = pairs
    stats = RelayStats()
    owner = _Owner(parked=True)
    owner.fast = _fast(src, dst, stats, idle=30.0)
    data = payload(5000, 11)
    _feed(src_peer, data)
    _settle(src, len(data))
    theirs, woken = _deliver({src.fileno(): (owner, CLIENT)}, [(src.fileno(), IN | OUT)])
    assert (theirs, woken, owner.calls) == (None, [], [])
    assert owner.readable[CLIENT] == 0 and owner.task == "the task"
    assert (stats.bytes_from_client, stats.bytes_to_client) == (len(data), 0)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data
    # Writable only: nothing is held, so nothing is asked.
    assert _deliver({src.fileno(): (owner, CLIENT)}, [(src.fileno(), OUT)])[1] == []
    assert owner.calls == []


def test_the_fast_path_hands_python_what_it_must_handle(pairs):
    """A deadline due to move, a reset, or an event that says "error"."""
    src_peer, src, dst, dst_peer = pairs
    stats = RelayStats()
    owner = _Owner(parked=True)
    owner.fast = _fast(src, dst, stats, idle=30.0)
    owners = {src.fileno(): (owner, CLIENT)}
    owner.deadline = 0.0  # behind now + idle: Python moves it
    data = payload(700, 12)
    _feed(src_peer, data)
    _settle(src, len(data))
    _deliver(owners, [(src.fileno(), IN)])
    assert owner.calls == [("ready", CLIENT, step.SHORT, len(data), 1, 0, 0)]
    assert stats.bytes_from_client == 0  # Python counts them (copy.py _after_move)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data
    owner.calls.clear()
    owner.deadline = math.inf
    _deliver(owners, [(src.fileno(), IN | select.EPOLLERR)])
    assert owner.calls == [("ready",)] and owner.readable[CLIENT] == 2
    owner.calls.clear()
    src_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    src_peer.close()  # a reset
    assert select.select([src], [], [], 5)[0], "the reset did not arrive"
    _deliver(owners, [(src.fileno(), IN)])
    assert owner.calls[0][:2] == ("ready", CLIENT) and owner.calls[0][2] == step.SRC_ERROR


def test_a_promotion_to_come_is_checked_by_the_fast_path(pairs):
    """Below the promotion's byte count and before its time the bytes are moved and
    counted; the chunk that reaches the count, or bytes moved after the time, go to
    Python (copy.py _moved stops the pair there)."""
    src_peer, src, dst, dst_peer = pairs
    stats = RelayStats()
    stats.bytes_to_client = 1000  # the promotion counts both directions
    owner = _Owner(parked=True)
    owners = {src.fileno(): (owner, CLIENT)}

    def fast(promote_bytes: int, promote_at: float):  # type: ignore[no-untyped-def]
        return (*_fast(src, dst, stats)[:8], promote_bytes, promote_at, None)

    owner.fast = fast(5000, math.inf)
    first = payload(3000, 14)
    _feed(src_peer, first)
    _settle(src, len(first))
    assert _deliver(owners, [(src.fileno(), IN)])[1] == [] and owner.calls == []
    assert stats.bytes_from_client == len(first)
    second = payload(1500, 15)  # 1000 + 3000 + 1500 reaches 5000
    _feed(src_peer, second)
    _settle(src, len(second))
    _deliver(owners, [(src.fileno(), IN)])
    assert owner.calls == [("ready", CLIENT, step.SHORT, len(second), 1, 0, 0)]
    assert stats.bytes_from_client == len(first)  # Python counts these (_after_move)
    owner.calls.clear()
    owner.fast = fast(1 << 30, 0.0)  # due by time
    third = payload(200, 16)
    _feed(src_peer, third)
    _settle(src, len(third))
    _deliver(owners, [(src.fileno(), IN)])
    assert owner.calls == [("ready", CLIENT, step.SHORT, len(third), 1, 0, 0)]
    _settle(dst_peer, len(first) + len(second) + len(third))
    assert _drain(dst_peer) == first + second + third


@pytest.mark.parametrize(
    ("event", "data_size"),
    # An edge that said only "readable" and finds bytes stops at their short read (rule
    # 6): the FIN's own edge comes after. One that finds the FIN alone ends.
    [(IN, 0), (IN | select.EPOLLRDHUP, 0), (IN | select.EPOLLRDHUP, 3000),
     (IN | select.EPOLLRDHUP | select.EPOLLHUP, 3000)],
)  # fmt: skip
def test_the_fast_path_ends_a_direction_without_python(pairs, event, data_size):
    """The bytes before the end are moved and counted, then the direction is ended as
    copy.py's ``_eof`` ends it, whatever the event said, with no call into Python but
    the flow's span event: the first end is the pair's ``first_eof``, a "half_closed"
    event, no promotion to come, the side marked in the fast path and the FIN passed on;
    a side whose direction ended is skipped after; the second end wakes the task."""
    src_peer, src, dst, dst_peer = pairs
    stats = _Flow()
    owner = _Owner(parked=True)
    fast = owner.fast = owner.fastpath = _fast(src, dst, stats, idle=30.0)
    owners = {src.fileno(): (owner, CLIENT)}
    data = payload(data_size, 13)
    if data:
        _feed(src_peer, data)
    src_peer.shutdown(socket.SHUT_WR)
    assert select.select([src], [], [], 5)[0], "the FIN did not arrive"
    theirs, woken = _deliver(owners, [(src.fileno(), event)])
    assert (theirs, woken, owner.calls, owner.task) == (None, [], [], "the task")
    assert (stats.bytes_from_client, stats.bytes_to_client) == (len(data), 0)
    assert (owner.c2u.done, owner.u2c.done) == (True, False)
    assert (owner.first_eof, owner.promoting) == (step.CLIENT_EOF, False)
    assert stats.events == [("half_closed", {"by": "client"})]
    assert owner.fast is owner.fastpath
    assert owner.fast == (*fast[:7], 1 << CLIENT, -1, 0.0, stats)
    _settle(dst_peer, len(data))
    assert dst_peer.recv(len(data) + 1) == data
    assert dst_peer.recv(1) == b""  # the FIN passed on
    # The ended side is skipped: its events ask nothing more.
    assert _deliver(owners, [(src.fileno(), IN | select.EPOLLRDHUP | OUT)])[1] == []
    assert owner.calls == [] and stats.events == [("half_closed", {"by": "client"})]


def test_the_fast_paths_second_end_wakes_the_task(pairs):
    """The other side's direction is over already: this end marks its direction done
    and wakes the task, which finds both over; the first end's reason stays, no second
    span event, no shutdown (the caller's close sends the FIN)."""
    src_peer, src, dst, dst_peer = pairs
    stats = _Flow()
    owner = _Owner(parked=True)
    owner.u2c.done, owner.first_eof, owner.promoting = True, step.BACKEND_EOF, False
    owner.fast = owner.fastpath = _fast(src, dst, stats, idle=30.0, ended=1 << UPSTREAM)
    src_peer.shutdown(socket.SHUT_WR)
    assert select.select([src], [], [], 5)[0], "the FIN did not arrive"
    theirs, woken = _deliver({src.fileno(): (owner, CLIENT)}, [(src.fileno(), IN)])
    assert (theirs, woken, owner.task, owner.calls) == (None, ["the task"], None, [])
    assert (owner.c2u.done, owner.u2c.done, owner.first_eof) == (True, True, step.BACKEND_EOF)
    assert stats.events == []
    dst_peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        dst_peer.recv(1)  # no FIN yet


def test_stats_that_are_no_flow_hear_of_no_half_close(pairs):
    src_peer, src, dst, dst_peer = pairs
    owner = _Owner(parked=True)
    owner.fast = owner.fastpath = _fast(src, dst, RelayStats(), idle=0.0)
    src_peer.shutdown(socket.SHUT_WR)
    assert select.select([src], [], [], 5)[0], "the FIN did not arrive"
    assert _deliver({src.fileno(): (owner, CLIENT)}, [(src.fileno(), IN)])[1] == []
    assert owner.c2u.done and owner.first_eof == step.CLIENT_EOF
    assert owner.fast[7:] == (1 << CLIENT, -1, 0.0, None)


@pytest.mark.parametrize(
    ("owners", "events", "error"),
    [
        ([], [], TypeError),  # owners not a dict
        ({}, [(1,)], TypeError),  # an event not (fd, events)
        ({1: (None,)}, [(1, IN)], TypeError),  # an owner not (waiter, side)
    ],
)
def test_deliver_bad_arguments_are_errors_not_crashes(owners, events, error):
    with pytest.raises(error):
        step.deliver(owners, print, time.perf_counter, events)


def test_an_error_serving_a_fast_path_is_its_owners_and_the_delivery_goes_on(pairs):
    """As ``_Pair.ready`` keeps one: the error becomes the owner's (its task, woken,
    raises it: its connection ends as an internal error), never the trio run's, and the
    rest of the events are delivered."""
    src_peer, src, dst, _ = pairs
    broken, other = _Owner(parked=True), _Owner(parked=True, serves=False)
    broken.fast = (1, 2, 3)  # type: ignore[assignment]
    owners = {src.fileno(): (broken, CLIENT), 99: (other, UPSTREAM)}
    theirs, woken = _deliver(owners, [(src.fileno(), IN), (99, IN)])
    assert isinstance(broken.error, TypeError) and "fast path" in str(broken.error)
    assert (theirs, woken, broken.task) == (None, ["the task", "the task"], None)
    assert other.calls == [("ready",)]
    broken.task, broken.error = "the task", None  # type: ignore[assignment]
    broken.fast = _fast(src, dst, object(), idle=0.0)  # stats without counters
    _feed(src_peer, b"x")
    _settle(src, 1)
    _deliver({src.fileno(): (broken, CLIENT)}, [(src.fileno(), IN)])
    assert isinstance(broken.error, AttributeError) and broken.task is None


def test_serve_is_the_delivery_for_one_event_called_by_the_pairs_task(pairs):
    """``serve`` moves a side's bytes as the delivery would (copy.py rule 8: a pair's
    first bytes), says whether the task can park, asks nothing of a pair without a fast
    path, and raises an error where the delivery would keep it for the owner."""
    src_peer, src, dst, dst_peer = pairs
    stats = RelayStats()
    owner = _Owner(parked=False)
    assert step.serve(owner, CLIENT, IN, time.perf_counter) is False  # no fast path
    owner.fast = _fast(src, dst, stats, idle=30.0)
    assert step.serve(owner, CLIENT, IN, time.perf_counter) is True  # nothing there yet
    data = payload(4000, 17)
    _feed(src_peer, data)
    _settle(src, len(data))
    assert step.serve(owner, CLIENT, IN, time.perf_counter) is True
    assert owner.calls == [] and owner.readable[CLIENT] == 0
    assert stats.bytes_from_client == len(data)
    _settle(dst_peer, len(data))
    assert _drain(dst_peer) == data
    owner.serves, owner.deadline = False, 0.0  # the deadline is Python's to move
    _feed(src_peer, b"more")
    _settle(src, 4)
    assert step.serve(owner, CLIENT, IN, time.perf_counter) is False
    assert owner.calls == [("ready", CLIENT, step.SHORT, 4, 1, 0, 0)]
    owner.fast = _fast(src, dst, object(), idle=0.0)  # stats without counters
    _feed(src_peer, b"x")
    _settle(src, 1)
    with pytest.raises(AttributeError):
        step.serve(owner, CLIENT, IN, time.perf_counter)
    with pytest.raises(ValueError):
        step.serve(owner, 2, IN, time.perf_counter)


def _wait(owners, epoll, timeout, woken=None):  # type: ignore[no-untyped-def]
    woken = [] if woken is None else woken
    return step.wait(owners, woken.append, time.perf_counter, epoll.fileno(), timeout, 8)


@pytest.fixture
def epoll():
    ep = select.epoll()
    yield ep
    ep.close()


def test_wait_delivers_the_owned_events_and_returns_trios(pairs, epoll):
    src_peer, src, dst, dst_peer = pairs
    for sock in (src, dst):
        epoll.register(sock.fileno(), IN | select.EPOLLET)
    owner = _Owner(parked=True)
    owners = {src.fileno(): (owner, CLIENT)}
    assert _wait(owners, epoll, 0) == []  # nothing came: false, as trio reads it
    _feed(src_peer, b"ping")
    _feed(dst_peer, b"pong")
    _settle(src, 4)
    _settle(dst, 4)
    woken: list[object] = []
    assert _wait(owners, epoll, 5.0, woken) == [(dst.fileno(), IN)]  # trio's, as a tuple
    assert owner.readable[CLIENT] == 1 and owner.calls == [("ready",)] and woken == []
    # Owned events only, and Python ran (ready): trio's loop has to look.
    _feed(src_peer, b"again")
    _settle(src, 5)
    assert _wait(owners, epoll, 5.0) is True
    assert owner.calls == [("ready",), ("ready",)]


def test_wait_serves_a_fast_pair_and_waits_on_for_trios_events(pairs, epoll):
    """Events served with no call into Python change nothing trio waits for: the wait
    goes on for the rest of its timeout, and ends with trio's first event, or empty
    once the timeout passed; a poll (timeout 0) returns True after serving."""
    src_peer, src, dst, dst_peer = pairs
    trios_peer, trios = socket.socketpair()
    with trios_peer, trios:
        for fd in (src.fileno(), trios.fileno()):
            epoll.register(fd, IN | select.EPOLLET)
        stats, owner = RelayStats(), _Owner(parked=True)
        owner.fast = _fast(src, dst, stats, idle=30.0)
        owners = {src.fileno(): (owner, CLIENT)}
        sent = bytearray()

        def feed_then_trio() -> None:
            for i in range(3):
                chunk = payload(1000, i)
                sent.extend(chunk)
                _feed(src_peer, chunk)
                time.sleep(0.05)
            trios_peer.send(b"t")

        feeder = threading.Thread(target=feed_then_trio)
        feeder.start()
        try:
            assert _wait(owners, epoll, 10.0) == [(trios.fileno(), IN)]
        finally:
            feeder.join()
        assert owner.calls == [] and stats.bytes_from_client == len(sent) == 3000
        assert _drain_all(dst_peer, len(sent)) == bytes(sent)
        _feed(src_peer, b"x")
        _settle(src, 1)
        start = time.monotonic()
        assert _wait(owners, epoll, 0.2) == []  # served, then the timeout passed
        assert time.monotonic() - start >= 0.2 and stats.bytes_from_client == 3001
        _feed(src_peer, b"y")
        _settle(src, 1)
        assert _wait(owners, epoll, 0) is True and stats.bytes_from_client == 3002


def test_wait_ends_at_a_signal_and_raises_a_handlers_error(epoll):
    """A signal runs its Python handler, and trio's loop looks again (True); a handler
    that raises ends the wait with its error."""
    heard: list[int] = []
    before = signal.signal(signal.SIGALRM, lambda signum, frame: heard.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert _wait({}, epoll, 5.0) is True and heard == [signal.SIGALRM]

        def fail(signum, frame):  # type: ignore[no-untyped-def]
            raise KeyError("from the handler")

        signal.signal(signal.SIGALRM, fail)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyError, match="from the handler"):
            _wait({}, epoll, 5.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize(
    ("timeout", "maxevents", "error"),
    [(math.nan, 4, ValueError), (0.0, 0, ValueError), ("soon", 4, TypeError)],
)
def test_wait_bad_arguments_are_errors_not_crashes(timeout, maxevents, error, epoll):
    with pytest.raises(error):
        step.wait({}, print, time.perf_counter, epoll.fileno(), timeout, maxevents)
    with pytest.raises(TypeError):
        step.wait([], print, time.perf_counter, epoll.fileno(), 0.0, 4)  # owners not a dict
    with socket.socket() as not_epoll, pytest.raises(OSError) as raised:
        step.wait({}, print, time.perf_counter, not_epoll.fileno(), 0.0, 4)
    assert raised.value.errno == errno.EINVAL


class _Counted(RelayStats):
    __slots__ = ()


def test_an_attribute_read_by_slot_follows_its_class_when_the_class_changes(pairs):
    """The delivery reads and writes a waiter's slots directly once it found them for
    its type; a class changed after that (here a property over the stats' count) is
    looked at again, and an attribute that is no slot takes Python's own path."""
    src_peer, src, dst, dst_peer = pairs
    stats, owner = _Counted(), _Owner(parked=True)
    owner.fast = _fast(src, dst, stats)
    owners = {src.fileno(): (owner, CLIENT)}
    for data in (b"first", b"second"):
        _feed(src_peer, data)
        _settle(src, len(data))
        _deliver(owners, [(src.fileno(), IN)])
    assert stats.bytes_from_client == len(b"firstsecond")
    seen: list[int] = []
    _Counted.bytes_from_client = property(  # type: ignore[assignment]
        lambda self: sum(seen), lambda self, value: seen.append(value - sum(seen))
    )
    try:
        _feed(src_peer, b"third")
        _settle(src, 5)
        _deliver(owners, [(src.fileno(), IN)])
        assert seen == [5] and owner.calls == []
    finally:
        del _Counted.bytes_from_client
    assert stats.bytes_from_client == len(b"firstsecond")  # the slot, untouched meanwhile
    assert _drain_all(dst_peer, len(b"firstsecondthird")) == b"firstsecondthird"


def _drain_all(sock: socket.socket, n: int) -> bytes:
    _settle(sock, n)
    return _drain(sock)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_accept_takes_a_connection_non_blocking_with_its_peer_as_the_socket_module_gives_it(
    family: socket.AddressFamily,
) -> None:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.create_server((host, 0), family=family) as listener:
        listener.setblocking(False)
        assert step.accept(listener) is None  # none waits: no exception
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        with client:
            assert select.select([listener], [], [], 5)[0]
            fd, peer = step.accept(listener)
            with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd) as conn:
                assert peer == client.getsockname() == conn.getpeername()
                assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
                assert conn.getblocking() is False and conn.type == socket.SOCK_STREAM
                client.sendall(b"hello")
                _settle(conn, 5)
                assert conn.recv(5) == b"hello"
    with pytest.raises(OSError) as raised:
        step.accept(listener)  # closed
    assert raised.value.errno == errno.EBADF
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
        step.accept(udp)  # no listener
