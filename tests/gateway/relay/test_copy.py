"""The core copy relay on real loopback sockets: bytes, half-close, resets, idle, promotion."""

from __future__ import annotations

import os
import time

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from gateway.flow import CloseReason, Flow
from gateway.relay import poller
from gateway.relay.copy import CopyRelay, Promotion
from gateway.relay.stats import RelayStats

from relay_helpers import (
    Topology,
    abort,
    copy_step,
    exchange,
    expect_reset,
    first_mismatch,
    payload,
    poller_set,
    recv_exact,
    recv_to_eof,
    send_all,
    topology,
)

# Every test in trio's own epoll set and in the poller's own (poller.py rule 4), each
# with the compiled loop and the Python one (copy.py rule 7).
pytestmark = pytest.mark.usefixtures(poller_set.__name__, copy_step.__name__)

MiB = 1 << 20


@pytest.mark.parametrize("size", [0, 1, 70_000, 8 * MiB])
async def test_bytes_both_ways_and_reason(size):
    relay = CopyRelay(65536)
    up, down = payload(size, 1), payload(size + 3, 2)
    with topology() as topo, trio.fail_after(30):
        stats = RelayStats()
        async with trio.open_nursery() as n:
            result = {}

            async def run() -> None:
                result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10)
                topo.close_gateway()

            n.start_soon(run)
            at_backend, at_client = await exchange(topo, up, down)
        assert at_backend == up, first_mismatch(at_backend, up)
        assert at_client == down, first_mismatch(at_client, down)
        assert (stats.bytes_from_client, stats.bytes_to_client) == (len(up), len(down))
        assert result["reason"] in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)


def test_one_relay_serves_one_trio_run_after_another():
    """A CopyRelay keeps the poller of the run it last relayed in (no lookup per flow)
    and takes the next run's once that run is over."""
    relay = CopyRelay(65536)
    pollers = []
    for _ in range(2):
        trio.run(_relay_one_flow, relay, 70_000)
        pollers.append(relay._poller)
    assert pollers[0] is not pollers[1] and not pollers[0].alive


async def _relay_one_flow(relay: CopyRelay, size: int) -> None:
    up, down = payload(size, 3), payload(size + 1, 4)
    with topology() as topo, trio.fail_after(30):
        async with trio.open_nursery() as n:

            async def run() -> None:
                await relay.run(topo.gw_client, topo.gw_upstream, RelayStats(), 10)
                topo.close_gateway()

            n.start_soon(run)
            at_backend, at_client = await exchange(topo, up, down)
    assert (at_backend, at_client) == (up, down)


async def test_slow_reader_bounded_and_intact():
    """A backend that reads slowly: the client's window closes, nothing is lost."""
    relay = CopyRelay(16384)
    up = payload(4 * MiB, 3)
    with topology(backend_rcvbuf=65536) as topo, trio.fail_after(60):
        stats = RelayStats()
        async with trio.open_nursery() as n:
            n.start_soon(relay.run, topo.gw_client, topo.gw_upstream, stats, 10)

            async def client() -> None:
                await send_all(topo.client, up)
                topo.client.shutdown(trio.socket.SHUT_WR)

            n.start_soon(client)
            got = await recv_to_eof(topo.backend, chunk=32768, delay=0.001)
            n.cancel_scope.cancel()
        assert got == up, first_mismatch(got, up)


async def test_reset_from_backend_becomes_reset_to_client():
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(10):
        stats = RelayStats()
        async with trio.open_nursery() as n:
            result = {}

            async def run() -> None:
                result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10)
                topo.close_gateway()

            n.start_soon(run)
            await send_all(topo.backend, b"partial")
            abort(topo.backend)
            await expect_reset(topo.client)
        assert result["reason"] == CloseReason.BACKEND_RESET


async def test_idle_timeout():
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(10):
        reason = await relay.run(topo.gw_client, topo.gw_upstream, RelayStats(), 0.2)
        assert reason == CloseReason.IDLE_TIMEOUT


async def _kept_alive_by_bytes(trios_clock: bool) -> None:
    """A pair that moves a byte every 0.15 s outlives its 0.4 s idle timeout, and
    closes as idle no earlier than 0.4 s after its last byte."""
    assert (poller.current().timer.offset is not None) is trios_clock
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(10):
        result: dict[str, object] = {}

        async def run() -> None:
            result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, RelayStats(), 0.4)
            result["at"] = trio.current_time()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            for i in range(8):  # 1.2 s of traffic, three idle timeouts' worth
                await send_all(topo.client, b"%d" % i)
                assert await recv_exact(topo.backend, 1) == b"%d" % i
                await trio.sleep(0.15)
            last = trio.current_time()
            assert "reason" not in result
        assert result["reason"] == CloseReason.IDLE_TIMEOUT
        assert result["at"] >= last + 0.4 - 0.15  # the last byte left 0.15 s before


async def test_bytes_that_move_keep_a_pair_alive() -> None:
    """On trio's own clock, which each chunk reads without a call (IdleTimer.offset)."""
    await _kept_alive_by_bytes(trios_clock=True)


async def test_bytes_that_move_keep_a_pair_alive_on_another_clock(
    mock_clock: trio.testing.MockClock,
) -> None:
    """On a clock that is not trio's own, which each chunk asks (IdleTimer.now)."""
    mock_clock.rate = 1
    await _kept_alive_by_bytes(trios_clock=False)


async def test_idle_timeout_with_bytes_on_the_way_resets_both_sides():
    """Cut by the idle timeout while the backend would not take the client's bytes: the
    backend reads what arrived, then a reset, never a FIN after a truncated stream."""
    relay = CopyRelay(65536)
    with topology(backend_rcvbuf=64 << 10) as topo, trio.fail_after(10):
        async with trio.open_nursery() as n:

            async def push() -> None:
                while True:
                    await topo.client.send(b"x" * 65536)

            n.start_soon(push)
            reason = await relay.run(topo.gw_client, topo.gw_upstream, RelayStats(), 0.3)
            topo.close_gateway()
            n.cancel_scope.cancel()
        assert reason == CloseReason.IDLE_TIMEOUT
        await expect_reset(topo.backend)
        await expect_reset(topo.client, sending=True)


async def test_promotion_hands_over_with_nothing_held():
    """Promoted after N bytes: a second relay continues and the stream is intact.

    This is how the relay plugin moves a flow to a kernel tier: the copy tier
    stops only where no byte is held in userspace.
    """
    relay = CopyRelay(65536)
    up, down = payload(6 * MiB, 4), payload(5 * MiB, 5)
    with topology() as topo, trio.fail_after(60):
        stats = RelayStats()
        reasons = []

        async def run() -> None:
            promote = Promotion(after_bytes=1 * MiB, at=time.monotonic() + 60)
            reasons.append(await relay.run(topo.gw_client, topo.gw_upstream, stats, 10, promote))
            moved = stats.bytes_from_client + stats.bytes_to_client
            reasons.append(moved)
            reasons.append(await relay.run(topo.gw_client, topo.gw_upstream, stats, 10))
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            at_backend, at_client = await exchange(topo, up, down)
        assert reasons[0] is None and 1 * MiB <= reasons[1] < len(up) + len(down)
        assert at_backend == up, first_mismatch(at_backend, up)
        assert at_client == down, first_mismatch(at_client, down)
        assert stats.bytes_from_client == len(up) and stats.bytes_to_client == len(down)


async def test_no_promotion_after_half_close():
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(10):
        stats = RelayStats()
        topo.client.shutdown(trio.socket.SHUT_WR)
        result = {}

        async def run() -> None:
            promote = Promotion(after_bytes=10, at=time.monotonic() + 60)
            result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10, promote)
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            await send_all(topo.backend, payload(100_000, 6))
            topo.backend.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == payload(100_000, 6)
        assert result["reason"] == CloseReason.CLIENT_EOF


async def _request_response(topo: Topology, request: bytes, response: bytes) -> None:
    """One exchange through the relay: the client's request reaches the backend, the
    backend's response reaches the client, each exact."""
    await send_all(topo.client, request)
    assert await recv_exact(topo.backend, len(request)) == request
    await send_all(topo.backend, response)
    assert await recv_exact(topo.client, len(response)) == response


async def test_promotion_by_age_while_parked_hands_over_at_the_next_bytes():
    """A pair parked between small exchanges is promoted by age at the first bytes that
    move after its time (rule 8: the compiled delivery checks the time and hands that
    event to Python, which stops the pair); the next relay carries on, every exchange
    exact both ways."""
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(20):
        stats = RelayStats()
        result: dict[str, object] = {}
        handed_over = trio.Event()

        async def run() -> None:
            promote = Promotion(after_bytes=1 << 40, at=time.monotonic() + 0.3)
            result["first"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10, promote)
            result["at"] = stats.bytes_from_client + stats.bytes_to_client
            handed_over.set()
            result["second"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10)
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            up_total = down_total = 0
            for i in range(40):
                request, response = payload(50 + i, 100 + 2 * i), payload(900 + i, 101 + 2 * i)
                await _request_response(topo, request, response)
                up_total += len(request)
                down_total += len(response)
                await trio.sleep(0.02)
            topo.client.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            topo.backend.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
        assert handed_over.is_set() and result["first"] is None
        assert 0 < result["at"] < up_total + down_total  # type: ignore[operator]
        assert result["second"] in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
        assert (stats.bytes_from_client, stats.bytes_to_client) == (up_total, down_total)


async def test_backend_speaks_first_and_an_idle_pair_is_one_task():
    """A backend that sends first (SMTP, SSH banners) is relayed before the client sends
    anything: the relay waits on both sockets at once. While it waits, the pair is one
    task, not one per direction (gateway/relay/copy.py, rule 6)."""
    relay = CopyRelay(65536)
    banner, request = payload(100, 7), payload(5000, 8)
    with topology() as topo, trio.fail_after(10):
        stats = RelayStats()
        result = {}

        async def run() -> None:
            result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 10)
            topo.close_gateway()

        async with trio.open_nursery() as n:
            n.start_soon(run)
            await trio.sleep(0.05)
            parent = trio.lowlevel.current_task()
            assert len(n.child_tasks) == 1, n.child_tasks
            (task,) = n.child_tasks
            assert not task.child_nurseries, "the pair runs a nursery of its own"
            assert parent is not task
            await send_all(topo.backend, banner)
            assert await recv_exact(topo.client, len(banner)) == banner
            await send_all(topo.client, request)
            assert await recv_exact(topo.backend, len(request)) == request
            topo.client.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            topo.backend.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
        assert result["reason"] == CloseReason.CLIENT_EOF
        assert (stats.bytes_from_client, stats.bytes_to_client) == (len(request), len(banner))


class _FailsInThePoller(CopyRelay):
    """A relay whose step fails once the poller runs it for a parked pair (outside the
    pair's own task); with the compiled delivery, which ends a direction without a step
    (rule 8), its flow's span event for the half-close fails there instead."""

    def __init__(self) -> None:
        super().__init__(65536)
        self.failed = False
        self.task: trio.lowlevel.Task | None = None
        """The pair's own task."""

    def fail_in_the_poller(self) -> None:
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:  # trio's loop itself, delivering (poller rule 4)
            task = None
        if task is not self.task and not self.failed:
            self.failed = True
            raise RuntimeError("a bug in a step")

    def _step(self, pair):  # type: ignore[no-untyped-def]
        self.fail_in_the_poller()
        return super()._step(pair)


class _FailingFlow(Flow):
    """A flow whose half-close event fails where ``relay`` fails its steps."""

    __slots__ = ("relay",)

    def __init__(self, relay: _FailsInThePoller) -> None:
        super().__init__(1, "test", "tcp", ("127.0.0.1", 1), ("127.0.0.1", 2))
        self.relay = relay

    def add_event(self, name: str, **attributes: object) -> None:
        self.relay.fail_in_the_poller()
        super().add_event(name, **attributes)


async def test_an_error_in_the_pollers_step_is_the_pairs_and_the_poller_lives_on():
    """An unexpected error while the poller moves a parked pair's bytes is raised by
    that pair's own task (its connection ends as an internal error), never by the
    poller's system task: the next relay of the process is served as usual."""
    relay = _FailsInThePoller()
    with topology() as topo, trio.fail_after(10):
        async with trio.open_nursery() as n:
            outcome: dict[str, BaseException] = {}

            async def run() -> None:
                relay.task = trio.lowlevel.current_task()
                try:
                    await relay.run(topo.gw_client, topo.gw_upstream, _FailingFlow(relay), 10)
                except RuntimeError as exc:
                    outcome["error"] = exc
                topo.close_gateway()

            n.start_soon(run)
            await wait_all_tasks_blocked()  # the pair's task parked in the poller
            if not relay.failed:
                # Else the Python delivery's step for the registration's event failed
                # already. With the compiled delivery the FIN's event fails (it moves
                # the bytes itself and ends the direction, with the flow's half-close
                # event: rule 8). With the Python delivery the bytes' event fails the
                # step, and the pair may be closed (and the backend's connection with
                # it) before the FIN is sent.
                await send_all(topo.backend, b"hello")
                try:
                    topo.backend.shutdown(trio.socket.SHUT_WR)
                except OSError:
                    pass
            await recv_to_eof(topo.client)
        assert relay.failed and str(outcome["error"]) == "a bug in a step"
    # The poller survived: a second relay in the same run moves bytes both ways.
    await test_bytes_both_ways_and_reason(70_000)


class _CountsSteps(CopyRelay):
    """A relay that counts its steps (each run by its task or by the Python poller) and
    the ends of directions it ran in Python."""

    def __init__(self) -> None:
        super().__init__(65536)
        self.steps = 0
        self.ends = 0

    def _step(self, pair):  # type: ignore[no-untyped-def]
        self.steps += 1
        return super()._step(pair)

    def _eof(self, d, stats, pair):  # type: ignore[no-untyped-def]
        self.ends += 1
        return super()._eof(d, stats, pair)


async def test_a_parked_pairs_exchanges_and_ends_are_moved_without_a_step(copy_step):
    """Rule 8: with the compiled delivery, the bytes of a parked pair's plain requests
    and responses are moved and counted where the event comes, with no step in Python
    (the idle deadline, an hour here, need not move), and so are the client's first
    bytes, by the task as it starts. The end of each direction is ended there too, with
    no step and no call into Python; the task, woken once both are over, runs none.
    Each exchange's bytes are different and arrive exact, both ways. The deadline's
    moves (_kept_alive_by_bytes) and a held chunk (test_slow_reader_bounded_and_intact)
    go through the fast path's hand-over to Python in the tests above."""
    relay = _CountsSteps()
    stats = RelayStats()
    exchanges = 60
    up_total = down_total = 0
    with topology() as topo, trio.fail_after(30):
        async with trio.open_nursery() as n:
            result: dict[str, str | None] = {}

            async def run() -> None:
                result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 3600)
                topo.close_gateway()

            n.start_soon(run)
            for i in range(exchanges):
                request, response = payload(100 + i, 2 * i), payload(3000 + 7 * i, 2 * i + 1)
                await _request_response(topo, request, response)
                up_total += len(request)
                down_total += len(response)
            steps = relay.steps
            topo.client.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            topo.backend.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
    assert result["reason"] in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
    assert (stats.bytes_from_client, stats.bytes_to_client) == (up_total, down_total)
    if copy_step:
        assert relay.steps == 0 and relay.ends == 0, (relay.steps, relay.ends)
    else:
        assert steps >= 2 * exchanges, steps
        assert relay.steps - steps >= 2, relay.steps - steps  # one per end


@pytest.mark.parametrize("when", ["before_run", "while_parked", "fin_later"])
async def test_short_reads_never_miss_an_eof(when):
    """A short read ends a side's reads without the EAGAIN read (rule 6), unless the
    event said the FIN is queued: data and FIN together, before the relay starts or
    while it is parked, or a FIN alone after the data, all end the pair at once (a
    missed FIN would hang it until the idle timeout, 30 s here). Data and FIN go out
    in one step, with no checkpoint between them, so on loopback both are queued at
    the gateway before its poller looks: one event says both."""
    relay = CopyRelay(65536)
    with topology() as topo, trio.fail_after(10):
        stats = RelayStats()
        result = {}

        async def run() -> None:
            result["reason"] = await relay.run(topo.gw_client, topo.gw_upstream, stats, 30)
            topo.close_gateway()

        def send_and_end(sock: trio.socket.SocketType, data: bytes) -> None:
            assert os.write(sock.fileno(), data) == len(data)
            sock.shutdown(trio.socket.SHUT_WR)

        async with trio.open_nursery() as n:
            if when == "before_run":
                send_and_end(topo.client, b"request")
            n.start_soon(run)
            if when == "while_parked":
                await wait_all_tasks_blocked()
                send_and_end(topo.client, b"request")
            elif when == "fin_later":
                assert os.write(topo.client.fileno(), b"request") == 7
                await wait_all_tasks_blocked()
                topo.client.shutdown(trio.socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b"request"
            await wait_all_tasks_blocked()  # the relay parked again
            send_and_end(topo.backend, b"reply")
            assert await recv_to_eof(topo.client) == b"reply"
        assert result["reason"] == CloseReason.CLIENT_EOF
        assert (stats.bytes_from_client, stats.bytes_to_client) == (7, 5)
