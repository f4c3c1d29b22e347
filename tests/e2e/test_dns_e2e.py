"""Backends by name through a real ``l4gw run`` and a real dnsmasq (tests/support/dnsmasq.py).

Every record has a TTL of 1 s (``--local-ttl=1``, ``min_ttl = "1s"``) and
``max_ttl = "2s"`` bounds the retry backoff, so a change or a recovery shows within
seconds. Backends listen on their own loopback addresses (127.0.0.11, .12, ...) on
one port, so a name's A records pick the backend. A backend answers the health
probe ("PING") with "PONG", and anything else with its name and a line break,
then echoes every byte until EOF: a connection that must stay on the old address
carries non-repeating bytes both ways and is compared byte for byte.

The backends run in this test's trio loop, so every blocking wait on the gateway
(its start, its log) runs in a thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from backends import recv_exactly
from dnsmasq import Dnsmasq, Srv
from dnsmasq import dns_server as dns_server  # the fixture
from gwproc import GatewayProcess, free_port
from netns import BACKEND6, CLIENT4, GW_BACKEND_SIDE6, GW_CLIENT_SIDE4, tcp_connect, tcp_listen
from netns import topology as topology  # the fixture
from relay_helpers import payload

pytestmark = pytest.mark.timeout(60)

TTL = 1.0
MAX_TTL = 2.0
DNS_TIMEOUT = 0.5


@dataclass
class Backend:
    """A named echo backend on ``host:port`` (see the module docstring)."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    served: int = 0
    peers: list[str] = field(default_factory=list)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                first = await stream.receive_some(65536)
                if first.startswith(b"PING"):
                    await stream.send_all(b"PONG\n")
                    return
                self.served += 1
                self.peers.append(stream.socket.getpeername()[0])
                await stream.send_all(self.name.encode() + b"\n")
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def run(
        self,
        listener: trio.SocketListener | None = None,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self.scope:
            if listener is None:
                listener = (await trio.open_tcp_listeners(self.port, host=self.host))[0]
            self.port = listener.socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self.serve, [listener])


async def start_backends(nursery: trio.Nursery, *named: tuple[str, str]) -> list[Backend]:
    """Backends (name, host) on one port (a free one), started."""
    for _ in range(20):
        port = free_port(named[0][1])
        backends = [Backend(name, host, port) for name, host in named]
        try:
            for b in backends:
                await nursery.start(b.run)
        except OSError:
            for b in backends:
                b.scope.cancel()
            continue
        return backends
    raise RuntimeError("no common free port")


async def hello(stream: trio.SocketStream) -> str:
    """Say hello on a fresh connection through the gateway: the backend's name, or ""."""
    try:
        await stream.send_all(b"HELLO")
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(64)
            if not chunk:
                return ""
            line += chunk
        return line.decode().strip()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return ""


async def ask(port: int, host: str = "127.0.0.1") -> str:
    """One short connection through the gateway: the backend's name, or "" if refused."""
    with trio.fail_after(5):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return ""
        async with stream:
            return await hello(stream)


async def start_gateway(
    gateway: Callable[..., GatewayProcess], config: str, **kw: Any
) -> GatewayProcess:
    return await trio.to_thread.run_sync(lambda: gateway(config, **kw))


async def wait_log(gw: GatewayProcess, pattern: str, timeout: float = 10, count: int = 1) -> str:
    return await trio.to_thread.run_sync(lambda: gw.wait_log(pattern, timeout, count))


def config(
    dns: Dnsmasq,
    port: int,
    endpoints: str,
    extra: str = "",
    *,
    bind: str = "127.0.0.1",
    family: str = "any",
) -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[dns]
servers = ["{dns.server}"]
family = "{family}"
min_ttl = "{TTL}s"
max_ttl = "{MAX_TTL}s"
timeout = "{DNS_TIMEOUT}s"

[[listener]]
name = "public"
bind = "{bind}:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = {endpoints}
connect_timeout = "1s"
{extra}
"""


async def exchange(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    return await recv_exactly(stream, len(data))


async def test_a_changed_record_moves_new_connections_and_keeps_the_open_one(
    dns_server, gateway, nursery
):
    a, b = await start_backends(nursery, ("a", "127.0.0.11"), ("b", "127.0.0.12"))
    name = dns_server.name("api")
    dns_server.set_hosts({name: [a.host]})
    port = free_port()
    gw = await start_gateway(gateway, config(dns_server, port, f'["{name}:{a.port}"]'))
    assert [await ask(port) for _ in range(3)] == ["a"] * 3

    # A connection opened before the change, carrying non-repeating bytes both ways.
    data = payload(256 << 10, seed=7)
    old = await trio.open_tcp_stream("127.0.0.1", port)
    async with old:
        assert await hello(old) == "a"
        echoed = await exchange(old, data[: 128 << 10])

        dns_server.set_hosts({name: [b.host]})
        changed = time.monotonic()
        while (answer := await ask(port)) != "b":
            assert answer == "a"
            assert time.monotonic() - changed < TTL + 1.0, "the new record was not used in time"
            await trio.sleep(0.05)
        await wait_log(
            gw,
            rf"discovery: cluster api: 1 endpoints, added {b.host}:{b.port}, "
            rf"removed {a.host}:{a.port}",
        )

        echoed += await exchange(old, data[128 << 10 :])
        await old.send_eof()
        assert await old.receive_some(1) == b""
    assert echoed == data, "the open connection lost or changed bytes"
    assert a.peers.count("127.0.0.1") == a.served  # every a connection came through the gateway
    assert [await ask(port) for _ in range(3)] == ["b"] * 3


async def test_two_records_balance_and_are_health_checked_per_address(dns_server, gateway, nursery):
    a, b = await start_backends(nursery, ("a", "127.0.0.11"), ("b", "127.0.0.12"))
    name = dns_server.name("api")
    dns_server.set_hosts({name: [a.host, b.host]})
    port = free_port()
    check = (
        'health_check = { interval = "0.2s", timeout = "0.2s", healthy_threshold = 1, '
        'unhealthy_threshold = 2, send = "PING\\n", expect = "PONG" }\n'
        "connect_attempts = 1\n"
    )
    gw = await start_gateway(gateway, config(dns_server, port, f'["{name}:{a.port}"]', check))
    answers = [await ask(port) for _ in range(10)]
    assert sorted(answers) == ["a"] * 5 + ["b"] * 5

    b.scope.cancel()  # b's address stops answering; a's stays
    await wait_log(gw, rf"endpoint {b.host}:{b.port} is unhealthy")
    assert f"endpoint {a.host}:{a.port} is unhealthy" not in gw.log
    assert [await ask(port) for _ in range(6)] == ["a"] * 6


async def test_dns_down_keeps_the_last_good_set_and_a_new_record_is_used_after(
    dns_server, gateway, nursery
):
    a, b = await start_backends(nursery, ("a", "127.0.0.11"), ("b", "127.0.0.12"))
    name = dns_server.name("api")
    dns_server.set_hosts({name: [a.host]})
    port = free_port()
    gw = await start_gateway(gateway, config(dns_server, port, f'["{name}:{a.port}"]'))
    assert await ask(port) == "a"

    dns_server.stop()
    stopped = time.monotonic()
    while time.monotonic() - stopped < 4 * TTL:  # several TTLs, several failed refreshes
        assert await ask(port) == "a"
        await trio.sleep(0.2)
    await wait_log(gw, r"resolution failed \(timeout: .*\); keeping 1 addresses")
    assert gw.log.count("keeping 1 addresses") == 1  # one line per outage

    dns_server.set_hosts({name: [b.host]})
    await trio.to_thread.run_sync(dns_server.start)
    restarted = time.monotonic()
    while (answer := await ask(port)) != "b":
        assert answer == "a"
        # The retry backoff is capped at max_ttl; then one query and a second of slack.
        assert time.monotonic() - restarted < MAX_TTL + DNS_TIMEOUT + 1.0
        await trio.sleep(0.05)
    await wait_log(gw, rf"{name}:{a.port}: resolves again after")


async def test_srv_targets_ports_priorities_and_weights(dns_server, gateway, nursery):
    (a,) = await start_backends(nursery, ("a", "127.0.0.11"))
    (b,) = await start_backends(nursery, ("b", "127.0.0.12"))
    (c,) = await start_backends(nursery, ("c", "127.0.0.13"))
    assert len({a.port, b.port, c.port}) == 3
    srv = dns_server.name("_api._tcp")
    t1, t2, t3 = (dns_server.name(t) for t in ("t1", "t2", "t3"))
    dns_server.set_hosts({t1: [a.host], t2: [b.host], t3: [c.host]})
    dns_server.set_srv(
        [
            Srv(srv, t1, a.port, priority=10, weight=3),
            Srv(srv, t2, b.port, priority=10, weight=1),
            Srv(srv, t3, c.port, priority=20, weight=1),  # a fallback only
        ]
    )
    port = free_port()
    gw = await start_gateway(gateway, config(dns_server, port, f'[{{ srv = "{srv}" }}]'))
    answers = [await ask(port) for _ in range(20)]
    # Smooth weighted round robin over the lowest priority: exactly 3 of every 4 to a.
    assert (answers.count("a"), answers.count("b"), answers.count("c")) == (15, 5, 0)
    assert "discovery" in gw.log


async def test_a_name_only_etc_hosts_knows(dns_server, gateway, nursery):
    (local,) = await start_backends(nursery, ("local", "127.0.0.1"))
    port = free_port()
    gw = await start_gateway(
        gateway, config(dns_server, port, f'["localhost:{local.port}"]', family="ipv4")
    )
    assert [await ask(port) for _ in range(3)] == ["local"] * 3
    assert dns_server.queries("localhost") == 0  # the system resolver answered it
    assert "dns:" not in gw.log  # no failure logged


@pytest.mark.privileged
async def test_aaaa_in_the_namespace_topology(topology, tmp_path, gateway, nursery):
    # dnsmasq inside the gateway's namespace, on its own loopback; the name has only an
    # AAAA record, the backend's IPv6 address in the backend namespace.
    dns = Dnsmasq(tmp_path / "dns-ns", netns=topology.gateway)
    name = dns.name("api6")
    dns.set_hosts({name: [BACKEND6]})
    await trio.to_thread.run_sync(dns.start)
    try:
        backend = Backend("six", BACKEND6, 8080)
        await nursery.start(backend.run, tcp_listen(topology.backend, BACKEND6, 8080))
        port = 9000
        await start_gateway(
            gateway,
            config(dns, port, f'["{name}:8080"]', bind=GW_CLIENT_SIDE4),
            netns=topology.gateway,
        )
        for _ in range(3):
            stream = await tcp_connect(topology.client, GW_CLIENT_SIDE4, port)
            async with stream:
                assert stream.socket.getsockname()[0] == CLIENT4
                assert await hello(stream) == "six"
        assert backend.peers == [GW_BACKEND_SIDE6] * 3  # reached over IPv6, from the gateway
    finally:
        dns.stop()
