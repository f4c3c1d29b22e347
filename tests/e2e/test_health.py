"""Active health checks and outlier ejection through a real ``l4gw run``.

The backends run in this test's trio loop, so every blocking wait on the
gateway (start, log lines) runs in a thread: the backends must keep
answering the gateway's probes meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.lowlevel

from backends import recv_all
from gwproc import GatewayProcess, free_port

INTERVAL, TIMEOUT, THRESHOLD = 0.2, 0.2, 2


@dataclass
class NamedBackend:
    """Answers "PING" with "PONG" (the health probe) and anything else with its name."""

    name: str
    served: int = 0
    port: int = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                data = await stream.receive_some(100)
                if data.startswith(b"PING"):
                    await stream.send_all(b"PONG\n")
                    return
                self.served += 1
                await stream.send_all(self.name.encode())
            except trio.BrokenResourceError:
                pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.serve, listeners)


async def start_backend(nursery: trio.Nursery, backend: NamedBackend) -> trio.CancelScope:
    """Start (or restart, on the same port) a backend; cancel the scope to kill it."""
    scope = trio.CancelScope()

    async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await backend.run(task_status=task_status)

    await nursery.start(run)
    return scope


async def ask(port: int) -> str:
    """One connection through the gateway: the backend's name, or "" if it failed."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(b"hello")
                return (await recv_all(stream)).decode()
            except trio.BrokenResourceError:
                return ""


async def start_gateway(
    gateway: Callable[..., GatewayProcess], config: str, name: str = "gw"
) -> GatewayProcess:
    return await trio.to_thread.run_sync(lambda: gateway(config, name=name))


async def wait_log(gw: GatewayProcess, pattern: str, timeout: float = 10, count: int = 1) -> str:
    return await trio.to_thread.run_sync(lambda: gw.wait_log(pattern, timeout, count))


def config(port: int, a: int, b: int, cluster_extra: str) -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{a}", "127.0.0.1:{b}"]
connect_timeout = "1s"
{cluster_extra}
"""


@pytest.mark.timeout(60)
async def test_killed_backend_is_marked_unhealthy_skipped_and_returns(nursery, gateway):
    a, b = NamedBackend("a"), NamedBackend("b")
    await start_backend(nursery, a)
    kill_b = await start_backend(nursery, b)
    port = free_port()
    check = (
        f'health_check = {{ interval = "{INTERVAL}s", timeout = "{TIMEOUT}s", '
        f"healthy_threshold = {THRESHOLD}, unhealthy_threshold = {THRESHOLD}, "
        'send = "PING\\n", expect = "PONG" }\n'
        # One attempt only: a connection sent to a dead backend would fail visibly.
        "connect_attempts = 1\n"
    )
    gw = await start_gateway(gateway, config(port, a.port, b.port, check))
    assert "2 endpoints checked, 0 unhealthy" in gw.log

    answers = [await ask(port) for _ in range(10)]
    assert sorted(answers) == ["a"] * 5 + ["b"] * 5

    kill_b.cancel()
    killed = time.monotonic()
    b_addr = f"127.0.0.1:{b.port}"
    await wait_log(gw, rf"endpoint {b_addr} is unhealthy")
    took = time.monotonic() - killed
    # Unhealthy after THRESHOLD probes: interval × threshold, plus a probe's
    # timeout and a second of slack for scheduling.
    assert took < INTERVAL * THRESHOLD + TIMEOUT + 1.0, f"took {took:.2f}s"

    served_b = b.served
    answers = [await ask(port) for _ in range(20)]
    assert answers == ["a"] * 20, "a connection went to the unhealthy backend"
    assert b.served == served_b

    await start_backend(nursery, b)  # same port
    await wait_log(gw, rf"endpoint {b_addr} is healthy")
    answers = [await ask(port) for _ in range(10)]
    assert sorted(answers) == ["a"] * 5 + ["b"] * 5


@pytest.mark.timeout(60)
async def test_outlier_ejection_and_retry_on_the_next_endpoint(nursery, gateway):
    a = NamedBackend("a")
    await start_backend(nursery, a)
    dead = free_port()  # nothing listens there: connects are refused
    port = free_port()
    extra = 'connect_attempts = 2\noutlier = { consecutive_failures = 2, ejection_time = "30s" }\n'
    gw = await start_gateway(gateway, config(port, dead, a.port, extra))
    # Every connection succeeds: a refused connect is retried on the next endpoint.
    answers = [await ask(port) for _ in range(12)]
    assert answers == ["a"] * 12
    await wait_log(gw, rf"endpoint 127.0.0.1:{dead} ejected for 30s after 2 connect failures")
    # After the ejection the dead endpoint is not even tried: one ejection only.
    await trio.lowlevel.checkpoint()
    assert gw.log.count("ejected for") == 1


@pytest.mark.timeout(60)
async def test_all_unhealthy_refuse_or_panic(nursery, gateway):
    """Both backends fail the check (they answer PING with their name, not PONG)."""
    a, b = NamedBackend("a"), NamedBackend("b")
    await start_backend(nursery, a)
    await start_backend(nursery, b)
    check = (
        f'health_check = {{ interval = "{INTERVAL}s", timeout = "{TIMEOUT}s", '
        'send = "HELLO\\n", expect = "PONG" }\n'
    )
    refuse_port, panic_port = free_port(), free_port()
    refuse = await start_gateway(gateway, config(refuse_port, a.port, b.port, check))
    assert "2 endpoints checked, 2 unhealthy" in refuse.log
    assert await ask(refuse_port) == ""
    await wait_log(refuse, r"connect_failed.*no endpoint available")

    panic_config = config(panic_port, a.port, b.port, check + 'on_no_healthy = "panic"\n')
    panic = await start_gateway(gateway, panic_config, name="panic")
    assert await ask(panic_port) in ("a", "b")
    await wait_log(panic, r"no healthy endpoint, panic mode")
