"""Health state machines on plain values, and the probes against real sockets."""

from __future__ import annotations

import socket
import tomllib
from functools import partial
from typing import Any

import pytest
import trio

from gateway import Endpoint
from gateway.config import from_dict
from l4gw_plugins.health import (
    CheckSpec,
    Ejection,
    Health,
    HealthState,
    cluster_transports,
    probe,
    tcp_probe,
    udp_probe,
)


def test_health_state_thresholds() -> None:
    s = HealthState()
    # The first result decides by itself.
    assert s.observe(False, 2, 3) is True and not s.healthy
    assert s.observe(True, 2, 3) is False and not s.healthy
    assert s.observe(True, 2, 3) is True and s.healthy
    assert s.observe(False, 2, 3) is False
    assert s.observe(False, 2, 3) is False
    # A success in between resets the failure count.
    assert s.observe(True, 2, 3) is False
    assert [s.observe(False, 2, 3) for _ in range(3)] == [False, False, True]
    assert not s.healthy


def test_first_probe_ok_stays_healthy() -> None:
    s = HealthState()
    assert s.observe(True, 2, 2) is False and s.healthy and s.known


def test_ejection() -> None:
    e = Ejection()
    assert [e.failure(0.0, 3, 10.0) for _ in range(3)] == [False, False, True]
    assert e.ejected(5.0) and not e.ejected(10.0)
    # While ejected, failures do not pile up.
    assert e.failure(5.0, 3, 10.0) is False
    e.success()
    assert [e.failure(11.0, 3, 10.0) for _ in range(2)] == [False, False]
    e.success()
    assert [e.failure(12.0, 3, 10.0) for _ in range(3)] == [False, False, True]


def test_filter_and_outlier_ejection() -> None:
    now = [100.0]
    h = Health(clock=lambda: now[0])
    h._outlier["api"] = (2, 5.0)
    a, b = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2)
    eps = (a, b)
    assert h.filter("api", eps) is eps
    h.connect_result("api", a, "refused")
    assert list(h.filter("api", eps)) == [a, b]
    h.connect_result("api", a, "refused")
    assert list(h.filter("api", eps)) == [b]
    assert h.ejection_count == 1
    now[0] += 5.0
    assert list(h.filter("api", eps)) == [a, b]
    # Clusters without an outlier rule never eject.
    for _ in range(10):
        h.connect_result("other", a, "refused")
    assert h.available("other", a)


def test_record_marks_unhealthy_and_back() -> None:
    h = Health()
    spec = CheckSpec("tcp", 1.0, 1.0, 2, 2, b"", b"")
    key = ("api", "127.0.0.1", 9)
    e = Endpoint("127.0.0.1", 9)
    h.record(key, spec, None)
    assert h.available("api", e)
    h.record(key, spec, "connect: refused")
    assert h.available("api", e)
    h.record(key, spec, "connect: refused")
    assert not h.available("api", e) and h.transitions == 1
    h.record(key, spec, None)
    h.record(key, spec, None)
    assert h.available("api", e) and h.transitions == 2


# --- probes against real sockets ---------------------------------------------------


async def _tcp_server(nursery: trio.Nursery, reply: bytes | None) -> int:
    """A listener that answers each connection with ``reply`` (None: says nothing)."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await stream.receive_some(100)
                if reply is not None:
                    await stream.send_all(reply)
                await trio.sleep(5)
            except trio.BrokenResourceError:
                pass

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def _closed_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(20)
async def test_tcp_probe(nursery: trio.Nursery) -> None:
    port = await _tcp_server(nursery, b"+PONG\r\n")
    assert await tcp_probe("127.0.0.1", port) is None
    assert await tcp_probe("127.0.0.1", port, b"PING\r\n", b"+PONG") is None
    error = await tcp_probe("127.0.0.1", port, b"PING\r\n", b"+OK")
    assert error is not None and "does not start with" in error
    error = await tcp_probe("127.0.0.1", _closed_port())
    assert error is not None and "refused" in error.lower()
    silent = await _tcp_server(nursery, None)
    spec = CheckSpec("tcp", 1.0, 0.2, 1, 1, b"PING\r\n", b"+PONG")
    assert await probe(spec, "127.0.0.1", silent) == "timed out after 0.2s"


@pytest.mark.timeout(20)
async def test_tcp_probe_ipv6(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, _close_at_once, 0, host="::1"))
    port = listeners[0].socket.getsockname()[1]
    assert await tcp_probe("::1", port) is None


async def _close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def _udp_server(
    reply: Any, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A real UDP socket: answers ``reply(datagram)`` unless that is None."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, peer = await sock.recvfrom(65535)
            answer = reply(data)
            if answer is not None:
                await sock.sendto(answer, peer)


@pytest.mark.timeout(20)
async def test_udp_probe(nursery: trio.Nursery) -> None:
    echo = await nursery.start(_udp_server, lambda d: b"pong:" + d)
    assert await udp_probe("127.0.0.1", echo, b"ping", b"pong:ping") is None
    assert await udp_probe("127.0.0.1", echo, b"ping") is None
    error = await udp_probe("127.0.0.1", echo, b"ping", b"PONG")
    assert error is not None and "does not start with" in error
    # Nobody listening: ICMP port unreachable fails the probe at once.
    with trio.fail_after(2):
        error = await udp_probe("127.0.0.1", _closed_port(socket.SOCK_DGRAM), b"ping", b"")
    assert error is not None and "refused" in error.lower()
    silent = await nursery.start(_udp_server, lambda d: None)
    spec = CheckSpec("udp", 1.0, 0.2, 1, 1, b"ping", b"pong")
    assert await probe(spec, "127.0.0.1", silent) == "timed out after 0.2s"


CONFIG = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"

[[listener]]
name = "dns"
bind = "127.0.0.1:1"
protocol = "udp"

[[route]]
listener = "public"
cluster = "api"

[[route]]
listener = "dns"
cluster = "resolvers"

[cluster.api]
endpoints = ["127.0.0.1:{up}", "127.0.0.1:{down}"]
health_check = {{ interval = "100ms", timeout = "200ms", healthy_threshold = 1, unhealthy_threshold = 1 }}

[cluster.resolvers]
endpoints = ["127.0.0.1:{udp}"]
health_check = {{ interval = "100ms", timeout = "200ms", send = "ping", expect = "pong" }}
"""


@pytest.mark.timeout(20)
async def test_checks_run_from_startup_and_follow_reloads(nursery: trio.Nursery) -> None:
    up = await _tcp_server(nursery, b"")
    down = _closed_port()
    udp = await nursery.start(_udp_server, lambda d: b"pong")
    config = from_dict(tomllib.loads(CONFIG.format(up=up, down=down, udp=udp)), "t", {})
    assert cluster_transports(config) == {"api": "tcp", "resolvers": "udp"}
    h = Health()
    h.l4gw_configure(config)
    async with trio.open_nursery() as background:
        await h.l4gw_startup(config, background)
        # Start-up waited for the first probes.
        assert not h.available("api", Endpoint("127.0.0.1", down))
        assert h.available("api", Endpoint("127.0.0.1", up))
        assert h.available("resolvers", Endpoint("127.0.0.1", udp))
        # A reload without the health check drops its state and its checker.
        raw = tomllib.loads(CONFIG.format(up=up, down=down, udp=udp))
        del raw["cluster"]["api"]["health_check"]
        h.l4gw_configure(from_dict(raw, "t", {}))
        assert h.available("api", Endpoint("127.0.0.1", down))
        checks = h.checks
        await trio.sleep(0.35)
        # Only the UDP cluster is still probed (about 3 more probes).
        assert 1 <= h.checks - checks <= 6
        background.cancel_scope.cancel()


def test_connect_results_are_declared_idle_without_an_outlier_rule() -> None:
    text = '[[listener]]\nname = "l"\nbind = "127.0.0.1:0"\n[cluster.api]\nendpoints = ["127.0.0.1:9"]\n'
    h = Health()
    assert h.l4gw_configure(from_dict(tomllib.loads(text), "t", {})) == {"l4gw_connect_attempt"}
    text += "[cluster.api.outlier]\nconsecutive_failures = 2\n"
    assert h.l4gw_configure(from_dict(tomllib.loads(text), "t", {})) is None
