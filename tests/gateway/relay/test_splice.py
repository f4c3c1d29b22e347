"""Byte-exact tests of the splice(2) relay tier over real loopback sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import socket
import time
from pathlib import Path

import pytest
import trio

from gateway.relay import poller
from gateway.relay.pipes import KEEP
from gateway.relay.splice import PIPE_SIZE, splice_relay, splice_self_test
from gateway.relay.stats import RelayStats

from relay_helpers import (
    Topology,
    abort,
    expect_reset,
    first_mismatch,
    payload,
    poller_set,
    recv_exact,
    recv_to_eof,
    send_all,
    topology,
)

# Every test both ways: in trio's own epoll set, and in the poller's own (poller.py rule 4).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures(poller_set.__name__)]

_WMEM_MAX = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


class Relay:
    """Runs splice_relay on one topology, then closes the gateway sockets as the core does."""

    def __init__(self, topo: Topology, idle_timeout: float | None = None) -> None:
        self.topo = topo
        self.stats = RelayStats()
        self.idle_timeout = idle_timeout
        self.reason: str | None = None
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            self.reason = await splice_relay(
                self.topo.gw_client,
                self.topo.gw_upstream,
                self.stats,
                idle_timeout=self.idle_timeout,
            )
        finally:
            self.topo.close_gateway()
            self.done.set()


async def _exchange(topo: Topology, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    """Both ends send their payload and SHUT_WR concurrently, and read to EOF."""
    got: dict[str, bytes] = {}

    async def side(sock: trio.socket.SocketType, data: bytes, key: str) -> None:
        async def writer() -> None:
            await send_all(sock, data)
            sock.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            got[key] = await recv_to_eof(sock)

    async with trio.open_nursery() as n:
        n.start_soon(side, topo.client, up, "client")
        n.start_soon(side, topo.backend, down, "backend")
    return got["backend"], got["client"]


def test_self_test_passes_here() -> None:
    assert splice_self_test() is None


@pytest.mark.parametrize("size", [0, 1, 1000, 70_000, 64 << 20])
async def test_transfer_both_directions_exact(size: int) -> None:
    up, down = payload(size, 1), payload(size, 2)
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            at_backend, at_client = await _exchange(topo, up, down)
        assert at_backend == up, first_mismatch(at_backend, up)
        assert at_client == down, first_mismatch(at_client, down)
        assert relay.reason in ("client_eof", "backend_eof")
        assert relay.stats.bytes_from_client == size
        assert relay.stats.bytes_to_client == size


async def test_pre_insertion_bytes_delivered_promptly() -> None:
    data = payload(3004, 3)
    with topology() as topo:
        await send_all(topo.client, data)
        await trio.sleep(0.05)  # queued on gw_client before the relay starts
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            with trio.fail_after(0.1):
                got = await recv_exact(topo.backend, len(data))
            assert got == data
            topo.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            topo.backend.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
        assert relay.reason == "client_eof"


async def test_server_speaks_first_banner() -> None:
    banner = b"220 l4gw test banner\r\n"
    with topology() as topo:
        await send_all(topo.backend, banner)
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            with trio.fail_after(0.1):
                assert await recv_exact(topo.client, len(banner)) == banner
            await send_all(topo.client, b"HELO x\r\n")
            assert await recv_exact(topo.backend, 8) == b"HELO x\r\n"
            topo.backend.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
            topo.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
        assert relay.reason == "backend_eof"


async def test_client_half_close_then_full_reply() -> None:
    request, reply = payload(5 << 20, 4), payload(7 << 20, 5)
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            await send_all(topo.client, request)
            topo.client.shutdown(socket.SHUT_WR)
            # The backend answers only after it saw EOF: the reverse half must still work.
            got = await recv_to_eof(topo.backend)
            assert got == request, first_mismatch(got, request)
            n.start_soon(send_and_shut, topo.backend, reply)
            got_reply = await recv_to_eof(topo.client)
            assert got_reply == reply, first_mismatch(got_reply, reply)
        assert relay.reason == "client_eof"


async def test_backend_half_close_then_client_keeps_sending() -> None:
    banner, upload = payload(3 << 20, 6), payload(9 << 20, 7)
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            await send_and_shut(topo.backend, banner)
            got = await recv_to_eof(topo.client)
            assert got == banner, first_mismatch(got, banner)
            n.start_soon(send_and_shut, topo.client, upload)
            got_up = await recv_to_eof(topo.backend)
            assert got_up == upload, first_mismatch(got_up, upload)
        assert relay.reason == "backend_eof"


async def send_and_shut(sock: trio.socket.SocketType, data: bytes) -> None:
    await send_all(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def test_half_close_under_64mib_backlog_slow_reader() -> None:
    data = payload(64 << 20, 8)
    with topology(backend_rcvbuf=64 << 10) as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            n.start_soon(send_and_shut, topo.client, data)
            await trio.sleep(0.2)  # let the backlog build against the small window
            got = await recv_to_eof(topo.backend)
            assert got == data, first_mismatch(got, data)
            topo.backend.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
        assert relay.reason == "client_eof"


async def test_pure_fin_keeps_reverse_direction() -> None:
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            topo.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            late = payload(100_000, 9)
            await send_all(topo.backend, late)
            assert await recv_exact(topo.client, len(late)) == late
            topo.backend.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.client) == b""
            err = topo.backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == 0
        assert relay.reason == "client_eof"


@pytest.mark.parametrize("who", ["client", "backend"])
async def test_reset_propagates(who: str) -> None:
    with topology() as topo:
        resetter, victim = (
            (topo.client, topo.backend) if who == "client" else (topo.backend, topo.client)
        )
        relay = Relay(topo)
        failed = trio.Event()
        errors: list[int | None] = []

        async def stream() -> None:
            # The victim streams (more than any buffer holds) until the reset reaches it;
            # the one task sending on it is the one that sees the error.
            try:
                await send_all(victim, payload(64 << 20, 10))
            except OSError as exc:
                errors.append(exc.errno)
            failed.set()

        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            n.start_soon(stream)
            await recv_exact(resetter, 1 << 20)
            abort(resetter)
            with trio.fail_after(1.0):
                await failed.wait()
            assert errors and errors[0] in (errno.ECONNRESET, errno.EPIPE), errors
            n.cancel_scope.cancel()
        assert relay.reason == f"{who}_reset"


async def test_reset_seen_by_reader_not_clean_eof() -> None:
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            await send_all(topo.backend, b"partial")
            assert await recv_exact(topo.client, 7) == b"partial"
            abort(topo.backend)
            with trio.fail_after(1.0):
                await expect_reset(topo.client)
        assert relay.reason == "backend_reset"


async def test_idle_timeout() -> None:
    with topology() as topo:
        relay = Relay(topo, idle_timeout=0.3)
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            # Activity postpones the timeout.
            for i in range(4):
                await send_all(topo.client, payload(10, i))
                await recv_exact(topo.backend, 10)
                await trio.sleep(0.15)
            await relay.done.wait()
        elapsed = trio.current_time() - t0
        assert relay.reason == "idle_timeout"
        # Last activity was ~0.45 s in (the 4th echo), so the timeout fires ~0.75 s in.
        assert 0.7 <= elapsed < 2.0, elapsed


async def test_idle_timeout_with_bytes_on_the_way_resets_both_sides() -> None:
    """Cut by the idle timeout while the backend would not take the client's bytes (some
    sit in the pipe): the backend reads what arrived, then a reset, never a FIN."""
    with topology(backend_rcvbuf=64 << 10) as topo, trio.fail_after(10):
        relay = Relay(topo, idle_timeout=0.3)
        async with trio.open_nursery() as n:

            async def push() -> None:
                while True:
                    await topo.client.send(b"x" * 65536)

            n.start_soon(push)
            await relay.run()
            n.cancel_scope.cancel()
        assert relay.reason == "idle_timeout"
        await expect_reset(topo.backend)
        await expect_reset(topo.client, sending=True)


async def test_ping_pong_not_corked() -> None:
    with topology() as topo:
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            msg = payload(64, 11)
            t0 = time.perf_counter()
            with trio.fail_after(10):
                for _ in range(500):
                    await send_all(topo.client, msg)
                    await recv_exact(topo.backend, 64)
                    await send_all(topo.backend, msg)
                    await recv_exact(topo.client, 64)
            rtt = (time.perf_counter() - t0) / 500
            topo.client.shutdown(socket.SHUT_WR)
            topo.backend.shutdown(socket.SHUT_WR)
        # A corked MSG_MORE segment would add ~200 ms (delayed-ACK timer) per round trip.
        assert rtt < 0.02, rtt


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_slow_reader_bounded_memory(direction: str) -> None:
    total = 24 << 20
    data = payload(total, 12)
    with topology(backend_rcvbuf=64 << 10, client_rcvbuf=64 << 10) as topo:
        sender, reader = (
            (topo.client, topo.backend) if direction == "upload" else (topo.backend, topo.client)
        )
        # Fixed gateway receive buffers (no autotuning up to tcp_rmem max) make the
        # bound below tight; the kernel doubles the value for overhead.
        for g in (topo.gw_client, topo.gw_upstream):
            g.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
        relay = Relay(topo)
        sent = 0
        received = 0
        worst = 0

        async def write() -> None:
            nonlocal sent
            view = memoryview(data)
            while view:
                k = await sender.send(view[: 64 << 10])
                sent += k
                view = view[k:]
            sender.shutdown(socket.SHUT_WR)

        async def read() -> bytes:
            nonlocal received, worst
            buf = bytearray()
            while True:
                chunk = await reader.recv(64 << 10)
                if not chunk:
                    return bytes(buf)
                buf += chunk
                received += len(chunk)
                worst = max(worst, sent - received)
                await trio.sleep(0.002)  # ~30 MB/s reader

        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            n.start_soon(write)
            got = await read()
            reader.shutdown(socket.SHUT_WR)
        assert got == data, first_mismatch(got, data)
        # In flight = sender's sndbuf + gateway rcvbuf + pipe + gateway sndbuf + reader rcvbuf.
        # Each socket buffer is capped by tcp_wmem/tcp_rmem max; the pipe by PIPE_SIZE.
        bound = 2 * _WMEM_MAX + 2 * (512 << 10) + PIPE_SIZE + 2 * (128 << 10) + (1 << 20)
        assert worst < min(bound, total), (worst, bound)


async def test_200_concurrent_flows_random_sizes_and_close_orders() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    rng = random.Random(20240601)
    flows = 200
    results: list[tuple[bool, bool, str | None, RelayStats, int, int]] = []

    async def one(i: int) -> None:
        def size() -> int:
            r = rng.random()
            return 0 if r < 0.05 else rng.randrange(1, 64 << 10 if r < 0.7 else 2 << 20)

        up_n, down_n = size(), size()
        up, down = payload(up_n, 1000 + i), payload(down_n, 5000 + i)
        order = rng.choice(["client_first", "backend_first", "together"])
        with topology() as topo:
            relay = Relay(topo)
            got: dict[str, bytes] = {}

            async def client_side() -> None:
                if order == "backend_first":
                    got["client"] = await recv_to_eof(topo.client)
                    await send_and_shut(topo.client, up)
                else:
                    async with trio.open_nursery() as m:
                        m.start_soon(send_and_shut, topo.client, up)
                        got["client"] = await recv_to_eof(topo.client)

            async def backend_side() -> None:
                if order == "client_first":
                    got["backend"] = await recv_to_eof(topo.backend)
                    await send_and_shut(topo.backend, down)
                else:
                    async with trio.open_nursery() as m:
                        m.start_soon(send_and_shut, topo.backend, down)
                        got["backend"] = await recv_to_eof(topo.backend)

            async with trio.open_nursery() as n:
                n.start_soon(relay.run)
                n.start_soon(client_side)
                n.start_soon(backend_side)
            results.append(
                (
                    got["backend"] == up,
                    got["client"] == down,
                    relay.reason,
                    relay.stats,
                    up_n,
                    down_n,
                )
            )

    with trio.fail_after(50):
        async with trio.open_nursery() as n:
            for i in range(flows):
                n.start_soon(one, i)
    assert len(results) == flows
    for ok_up, ok_down, reason, stats, up_n, down_n in results:
        assert ok_up and ok_down
        assert reason in ("client_eof", "backend_eof")
        assert (stats.bytes_from_client, stats.bytes_to_client) == (up_n, down_n)


# --- pipes lent only while bytes are in them (rule 2) ------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_idle_flow_holds_no_pipe() -> None:
    """Once its bytes are through, a flow gives its pipes back: 30 flows idling after
    an exchange both ways hold their sockets' descriptors and nothing else (two pipes
    per flow were four descriptors more), and all of them still relay byte-exact."""
    pool = poller.current().pipes
    flows, size = 30, 300_000
    with contextlib.ExitStack() as stack:
        topos = [stack.enter_context(topology()) for _ in range(flows)]
        relays = [Relay(t) for t in topos]
        before = _fds() - 2 * len(pool.free)
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                for r in relays:
                    n.start_soon(r.run)
                for i, t in enumerate(topos):
                    up, down = payload(size, 100 + i), payload(size + 1, 200 + i)
                    await send_all(t.client, up)
                    assert await recv_exact(t.backend, size) == up
                    await send_all(t.backend, down)
                    assert await recv_exact(t.client, size + 1) == down
                # Each pipe went back as it emptied, before its bytes reached a reader.
                assert pool.lent == 0
                assert len(pool.free) <= KEEP
                assert _fds() - 2 * len(pool.free) == before
                for i, t in enumerate(topos):  # still served, both ways, to the end
                    up, down = payload(1000, 300 + i), payload(999, 400 + i)
                    at_backend, at_client = await _exchange(t, up, down)
                    assert at_backend == up, first_mismatch(at_backend, up)
                    assert at_client == down, first_mismatch(at_client, down)
    assert all(r.reason in ("client_eof", "backend_eof") for r in relays)
    assert pool.lent == 0


@pytest.mark.timeout(60)
async def test_one_pipe_for_both_directions_when_no_more_can_be_made() -> None:
    """Near the descriptor limit only one pipe can be made: a direction that finds none
    waits for the other to empty its own and takes it then (rule 2), so both directions
    still arrive whole while a slow reader keeps the pipe busy, and nothing is lost."""
    pool = poller.current().pipes  # the relay poller and its pool exist before the limit
    up, down = payload(3 << 20, 31), payload((2 << 20) + 5, 32)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    with topology(backend_rcvbuf=64 << 10) as topo:
        # Small enough that the upload's pipe stays full while the backend reads slowly.
        topo.gw_upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        relay = Relay(topo)
        try:
            # Two above the highest open descriptor: the room for one pipe exists whether
            # or not this process has holes below it (CI's had none).
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(_open_fd_numbers()) + 3, hard))
            with contextlib.suppress(OSError):
                while True:  # the holes below the limit too
                    filler.append(os.open("/dev/null", os.O_RDONLY))
            os.close(filler.pop())
            os.close(filler.pop())  # room for one pipe
            got: dict[str, bytes] = {}

            async def side(sock: trio.socket.SocketType, data: bytes, key: str, d: float) -> None:
                async with trio.open_nursery() as m:
                    m.start_soon(send_and_shut, sock, data)
                    got[key] = await recv_to_eof(sock, chunk=64 << 10, delay=d)

            with trio.fail_after(40):
                async with trio.open_nursery() as n:
                    n.start_soon(relay.run)
                    n.start_soon(side, topo.client, up, "client", 0.0)
                    n.start_soon(side, topo.backend, down, "backend", 0.001)
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert pool.refused > 0, "the second direction never went without a pipe"
    assert got["backend"] == up, first_mismatch(got["backend"], up)
    assert got["client"] == down, first_mismatch(got["client"], down)
    assert relay.reason in ("client_eof", "backend_eof")


def _open_fd_numbers() -> list[int]:
    return [int(fd) for fd in os.listdir("/proc/self/fd")]


async def test_a_reset_on_a_socket_the_flow_is_not_using_is_met_later_without_spinning() -> None:
    """The client half-closes, then resets while the backend is quiet: its socket's
    error is always reported and level-triggered, so a task that woke for it would
    re-arm and wake again at once (measured: a whole core). The flow stays parked,
    costing nothing, and meets the reset when the backend next sends."""
    with topology() as topo, trio.fail_after(20):
        relay = Relay(topo)
        async with trio.open_nursery() as n:
            n.start_soon(relay.run)
            hello = payload(1000, 41)
            await send_all(topo.client, hello)
            assert await recv_exact(topo.backend, len(hello)) == hello
            topo.client.shutdown(socket.SHUT_WR)
            assert await recv_to_eof(topo.backend) == b""
            abort(topo.client)
            await trio.sleep(0.1)
            before = time.process_time()
            await trio.sleep(1.0)
            busy = time.process_time() - before
            await send_all(topo.backend, payload(10, 42))
            await relay.done.wait()
    assert busy < 0.5, f"the relay spun: {busy:.2f} s of CPU in 1 s"
    assert relay.reason == "client_reset"
