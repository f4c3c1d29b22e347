"""UDP through TPROXY, in the three-namespace topology (tests/support/netns.py).

Clients in the client namespace send to service addresses that exist nowhere
(198.18.2.0/24, fd00:2::/64); ``l4gw tproxy setup`` intercepts them for a real
``l4gw run`` in the gateway namespace, which forwards each session from the
client's own IP and port (``upstream_source = "client"``) to backends in the
backend namespace. Replies must come back from the address the client sent to:
``dig`` rejects any other ("reply from unexpected source"), and the Python
clients check the source of every datagram.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from gwproc import GatewayProcess, l4gw
from netns import BACKEND4, BACKEND6, CLIENT4, CLIENT6, Topology, inside
from netns import topology as topology  # the fixture

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(90)]

DNS_SVC, PEER_SVC4, PEER_SVC6 = "198.18.2.53", "198.18.2.54", "fd00:2::54"
BULK_SVCS = ("198.18.2.60", "198.18.2.61", "198.18.2.62")
PEER_PORT, BULK_PORT = 9953, 9960

StartGateway = Callable[..., GatewayProcess]


def config() -> str:
    return f"""
[gateway]
log_connections = true
drain_timeout = "1s"

[[listener]]
name = "u4"
bind = "0.0.0.0:15353"
protocol = "udp"
transparent = true
session_idle_timeout = "5s"
max_sessions = 5000

[[listener]]
name = "u6"
bind = "[::]:15353"
protocol = "udp"
transparent = true

[[route]]
name = "dns"
listener = "u4"
destination = ["{DNS_SVC}/32"]
ports = [53]
cluster = "dnsmasq"

[[route]]
name = "peer4"
listener = "u4"
destination = ["{PEER_SVC4}/32"]
cluster = "peer4"

[[route]]
name = "bulk"
listener = "u4"
destination = ["198.18.2.60/30"]
ports = [{BULK_PORT}]
cluster = "bulk"

[[route]]
name = "peer6"
listener = "u6"
destination = ["{PEER_SVC6}/128"]
cluster = "peer6"

[cluster.dnsmasq]
endpoints = ["{BACKEND4}:53"]
upstream_source = "client"

[cluster.peer4]
endpoints = ["{BACKEND4}:{PEER_PORT}"]
upstream_source = "client"

[cluster.peer6]
endpoints = ["[{BACKEND6}]:{PEER_PORT}"]
upstream_source = "client"

[cluster.bulk]
endpoints = ["{BACKEND4}:{BULK_PORT}"]
upstream_source = "client"

[tproxy]

[[tproxy.intercept]]
listener = "u4"
protocol = "udp"
interfaces = ["gw-cli"]
destination = ["198.18.2.0/24"]

[[tproxy.intercept]]
listener = "u6"
protocol = "udp"
interfaces = ["gw-cli"]
destination = ["fd00:2::/64"]
"""


@pytest.fixture
def tproxied(topology: Topology, gateway: StartGateway) -> tuple[Topology, GatewayProcess]:
    """The gateway running in its namespace, with ``l4gw tproxy setup`` done (and undone)."""
    gw = gateway(config(), netns=topology.gateway)
    done = l4gw("tproxy", "setup", "-c", str(gw.config_path), netns=topology.gateway)
    assert done.returncode == 0, done.stderr
    try:
        ruleset = topology.exec(topology.gateway, "nft", "list", "table", "inet", "l4gw").stdout
        assert re.search(r"meta l4proto udp .* tproxy ip to :15353", ruleset), ruleset
        assert re.search(r"meta l4proto udp .* tproxy ip6 to :15353", ruleset), ruleset
        yield topology, gw
    finally:
        l4gw("tproxy", "teardown", netns=topology.gateway)


def udp_socket(ns: str, host: str, port: int = 0) -> trio.socket.SocketType:
    """A trio UDP socket made in namespace ``ns`` and bound to ``(host, port)``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with inside(ns):
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


async def peer_backend(
    ns: str, host: str, port: int, seen: list[Any], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Replies to each datagram with JSON: the peer address it saw and the payload length."""
    with udp_socket(ns, host) as sock:
        await sock.bind((host, port))
        task_status.started()
        while True:
            data, peer = await sock.recvfrom(65536)
            seen.append(peer[:2])
            await sock.sendto(json.dumps({"peer": list(peer[:2]), "n": len(data)}).encode(), peer)


async def echo_backend(
    ns: str, host: str, port: int, seen: set[Any], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with udp_socket(ns, host) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        await sock.bind((host, port))
        task_status.started()
        while True:
            data, peer = await sock.recvfrom(65536)
            seen.add(peer[:2])
            await sock.sendto(data, peer)


async def ask(
    sock: trio.socket.SocketType,
    target: tuple[str, int],
    request: bytes,
    check: Callable[[bytes], bool],
    *,
    tries: int = 8,
    wait: float = 1.0,
    strays: list[Any] | None = None,
) -> bytes | None:
    """Send until a datagram *from ``target``* passes ``check``; anything else is a stray."""
    for _ in range(tries):
        await sock.sendto(request, target)
        with trio.move_on_after(wait):
            while True:
                data, source = await sock.recvfrom(65536)
                if source[:2] == target and check(data):
                    return data
                if strays is not None:
                    strays.append((source, data[:40]))
    return None


def start_dnsmasq(topo: Topology, workdir: Path) -> Path:
    log = workdir / "dnsmasq.log"
    topo.popen(
        topo.backend,
        "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--port", "53",
        "--listen-address", BACKEND4, "--bind-interfaces", "--address=/svc.test/198.18.9.9",
        "--log-queries", f"--log-facility={log}", f"--pid-file={workdir / 'dnsmasq.pid'}",
        "--user=root",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not (log.exists() and "started" in log.read_text()):
        assert time.monotonic() < deadline, "dnsmasq did not start"
        time.sleep(0.05)
    return log


# --- tests ----------------------------------------------------------------------------------


def test_dns_through_tproxy_answers_from_the_address_queried(
    tproxied: tuple[Topology, GatewayProcess], tmp_path: Path
) -> None:
    """dig asks 198.18.2.53 (not the gateway); dnsmasq answers the client's own IP; the answer
    comes back from 198.18.2.53:53, or dig would not accept it."""
    topo, gw = tproxied
    queries = start_dnsmasq(topo, tmp_path)
    for _ in range(2):  # two sessions (dig uses a new port each time)
        dig = topo.exec(topo.client, "dig", f"@{DNS_SVC}", "svc.test", "+tries=1", "+time=2")
        assert dig.returncode == 0, dig.stdout + dig.stderr
        assert "status: NOERROR" in dig.stdout, dig.stdout
        assert re.search(r"svc\.test\.\s+\d+\s+IN\s+A\s+198\.18\.9\.9", dig.stdout), dig.stdout
        assert f"SERVER: {DNS_SVC}#53({DNS_SVC}) (UDP)" in dig.stdout, dig.stdout
        assert "unexpected source" not in dig.stdout + dig.stderr
    text = queries.read_text()
    assert len(re.findall(rf"query\[A\] svc\.test from {re.escape(CLIENT4)}\b", text)) == 2, text
    log = gw.wait_log(r"udp session \d+ u4 .*route=dns .* idle_timeout", timeout=15, count=2)
    assert re.search(
        rf"client={re.escape(CLIENT4)}:\d+ dst={re.escape(DNS_SVC)}:53 route=dns "
        rf"endpoint={re.escape(BACKEND4)}:53 from_client=1/\d+B to_client=1/\d+B",
        log,
    ), log


async def test_backend_sees_client_ip_and_port_ipv4_and_ipv6(
    tproxied: tuple[Topology, GatewayProcess], nursery: trio.Nursery
) -> None:
    topo, gw = tproxied
    seen: list[Any] = []
    await nursery.start(peer_backend, topo.backend, BACKEND4, PEER_PORT, seen)
    await nursery.start(peer_backend, topo.backend, BACKEND6, PEER_PORT, seen)
    for client, svc in ((CLIENT4, PEER_SVC4), (CLIENT6, PEER_SVC6)):
        for port in (5000, 53):  # every destination port of the service is intercepted
            with udp_socket(topo.client, client) as sock:
                await sock.bind((client, 0))
                local = sock.getsockname()[:2]
                reply = await ask(sock, (svc, port), b"who am I?", lambda d: d.startswith(b"{"))
                assert reply is not None, (svc, port, gw.log)
                assert json.loads(reply) == {"peer": [local[0], local[1]], "n": 9}
                assert seen[-1] == local


async def test_one_client_port_to_two_destinations_of_one_backend(
    tproxied: tuple[Topology, GatewayProcess], nursery: trio.Nursery
) -> None:
    """Two sessions (one client port, two original destinations) routed to one endpoint
    cannot both use the client's port: the second keeps the client's IP, and each
    session's replies still reach the client from its own destination."""
    topo, gw = tproxied
    seen: list[Any] = []
    await nursery.start(peer_backend, topo.backend, BACKEND4, PEER_PORT, seen)
    with udp_socket(topo.client, CLIENT4) as sock:
        await sock.bind((CLIENT4, 0))
        local = sock.getsockname()[:2]
        first = await ask(sock, (PEER_SVC4, 5000), b"first", lambda d: b'"n": 5' in d)
        second = await ask(sock, (PEER_SVC4, 5001), b"second", lambda d: b'"n": 6' in d)
        again = await ask(sock, (PEER_SVC4, 5000), b"first", lambda d: b'"n": 5' in d)
    assert first is not None and second is not None and again is not None
    assert json.loads(first)["peer"] == [CLIENT4, local[1]]
    peer2 = json.loads(second)["peer"]
    assert peer2[0] == CLIENT4 and peer2[1] != local[1]
    assert json.loads(again) == json.loads(first)


async def test_1000_transparent_sessions_keep_their_ports_and_replies(
    tproxied: tuple[Topology, GatewayProcess], nursery: trio.Nursery
) -> None:
    """1,000 concurrent sessions to three service addresses, 1 B to 65,000 B, each from its
    own client port; the backend sees exactly those ports, each client only its replies."""
    topo, gw = tproxied
    seen: set[Any] = set()
    await nursery.start(echo_backend, topo.backend, BACKEND4, BULK_PORT, seen)
    strays: list[Any] = []
    failed: list[int] = []
    ports: set[int] = set()

    def size_of(i: int) -> int:
        return 65000 if i % 100 == 7 else 1 if i % 100 == 3 else (16, 1400)[i % 2]

    async def session(i: int) -> None:
        target = (BULK_SVCS[i % 3], BULK_PORT)
        with udp_socket(topo.client, CLIENT4) as sock:
            await sock.bind((CLIENT4, 0))
            ports.add(sock.getsockname()[1])
            size = size_of(i)
            stamp = i.to_bytes(2, "big")
            request = bytes([i % 256]) if size == 1 else (stamp * size)[:size]
            reply = await ask(
                sock, target, request, lambda d: d == request, tries=10, wait=2.0, strays=strays
            )
            if reply is None:
                failed.append(i)

    async with trio.open_nursery() as clients:
        for i in range(1000):
            clients.start_soon(session, i)
    assert not strays, strays[:5]
    assert not failed, f"{len(failed)} sessions not answered, e.g. {failed[:5]}"
    assert seen == {(CLIENT4, port) for port in ports}
