"""The shield's policy end to end: a real ``l4gw run`` with the real BPF program.

In the namespace topology (tests/support/netns.py), one gateway serves two
listeners in front of a backend; ``[plugin.ratelimit] shield_after``, ``[plugin.acl]
deny`` and ``l4gw shield`` put clients in the kernel shield. The kernel side alone
(attach modes, kill -9, recovery) is tests/e2e/test_shield_kernel.py.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gwproc import GatewayProcess, l4gw
from netns import (
    BACKEND4,
    CLIENT4,
    GW_CLIENT_SIDE4,
    GW_CLIENT_SIDE6,
    Topology,
    inside,
    ip,
    tcp_listen,
    tcp_socket_from,
)
from netns import topology as topology  # the fixture

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(90)]

StartGateway = Callable[..., GatewayProcess]
PORT, LB_PORT, BACKEND_PORT, ADMIN_PORT = 8443, 8444, 9000, 9901
GREETING = b"served by the backend\n"
OTHER4 = "198.18.0.3"  # a second client, never listed
OPERATOR4 = "198.18.0.5"  # listed by `l4gw shield add`
NEVER4 = "198.18.0.4"  # in [shield] never
BALANCER4 = "198.18.0.6"  # a PROXY-protocol balancer (proxy_protocol_trusted)
DENIED6, DENY6 = "fd00::88", "fd00::80/124"  # in [plugin.acl] deny
TTL = 4.0


def config() -> str:
    return f"""
[[listener]]
name = "web4"
bind = "{GW_CLIENT_SIDE4}:{PORT}"

[[listener]]
name = "web6"
bind = "[{GW_CLIENT_SIDE6}]:{PORT}"

[[listener]]
name = "lb"
bind = "{GW_CLIENT_SIDE4}:{LB_PORT}"
proxy_protocol = true
proxy_protocol_trusted = ["{BALANCER4}/32"]

[[route]]
listener = "web4"
cluster = "be"

[[route]]
listener = "web6"
cluster = "be"

[[route]]
listener = "lb"
cluster = "be"

[cluster.be]
endpoints = ["{BACKEND4}:{BACKEND_PORT}"]

[shield]
interfaces = ["gw-cli"]
mode = "tc"
never = ["{NEVER4}/32"]

[plugin.ratelimit]
per_client = {{ rate = 1, per = "3s", burst = 2 }}
shield_after = {{ refusals = 5, per = "10s", ttl = "{TTL:g}s" }}

[plugin.acl]
deny = ["{DENY6}"]

[admin]
bind = "127.0.0.1:{ADMIN_PORT}"
"""


async def attempt(topo: Topology, src: str, dst: str, timeout: float = 1.5) -> str:
    """One connection from ``src`` (client namespace) to the gateway.

    Returns "served" (the backend's greeting arrived), "refused" (the handshake
    completed, then the gateway closed or reset it), "timeout" (no SYN-ACK in
    ``timeout``: the shield dropped the SYNs) or "rejected" (an RST to the SYN).
    """
    with await tcp_socket_from(topo.client, src) as sock:
        with trio.move_on_after(timeout) as connecting:
            try:
                await sock.connect((dst, PORT))
            except ConnectionRefusedError:
                return "rejected"
            except ConnectionResetError:
                return "refused"  # accepted, then reset before connect() returned
        if connecting.cancelled_caught:
            return "timeout"
        data = b""
        with trio.move_on_after(3):
            try:
                while chunk := await sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                return "refused"
        return "served" if data == GREETING else "refused"


def admin_get(topo: Topology, path: str) -> str:
    with inside(topo.gateway):
        sock = socket.create_connection(("127.0.0.1", ADMIN_PORT), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def accepted(topo: Topology) -> float:
    """Connections the gateway accepted so far (closed and open), from /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(admin_get(topo, "/metrics")):
        if family.name in ("l4gw_connection_closed", "l4gw_connection_active"):
            total += sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return total


def shield_metrics(topo: Topology) -> dict[tuple[str, str], float]:
    """The l4gw_shield_* samples of /metrics: (sample name, its one label's value) -> value."""
    out = {}
    for family in text_string_to_metric_families(admin_get(topo, "/metrics")):
        for s in family.samples:
            if s.name.startswith("l4gw_shield_"):
                labels = [v for k, v in s.labels.items() if k.startswith("l4gw_shield_")]
                out[(s.name, labels[0] if labels else "")] = s.value
    return out


def listed(topo: Topology) -> dict[str, dict[str, Any]]:
    return {e["cidr"]: e for e in json.loads(admin_get(topo, "/shield"))["entries"]}


async def backend(topo: Topology, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async def greet(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(GREETING)

    listener = tcp_listen(topo.backend, BACKEND4, BACKEND_PORT)
    await trio.serve_listeners(greet, [listener], task_status=task_status)


async def test_shield_after_acl_and_operators(topology: Topology, gateway: StartGateway) -> None:
    topo = topology
    for address in (OTHER4, OPERATOR4, NEVER4, BALANCER4):
        ip("-n", topo.client, "addr", "add", f"{address}/24", "dev", "cli0")
    ip("-n", topo.client, "-6", "addr", "add", f"{DENIED6}/64", "dev", "cli0", "nodad")
    gw = gateway(config(), netns=topo.gateway)
    assert "shield: tc on gw-cli" in gw.log
    status = json.loads(admin_get(topo, "/status"))["shield"]
    assert status["kernel"]["enabled"] is True and status["kernel"]["mode"].startswith("tc")

    def shield(*args: str) -> tuple[int, str]:
        done = l4gw("shield", *args, "-c", str(gw.config_path), netns=topo.gateway)
        return done.returncode, done.stdout + done.stderr

    async with trio.open_nursery() as nursery:
        await nursery.start(backend, topo)

        # --- shield_after: a flooding client crosses it; the kernel drops its SYNs ---------
        outcomes = []
        for _ in range(20):
            outcome = await attempt(topo, CLIENT4, GW_CLIENT_SIDE4)
            outcomes.append(outcome)
            if outcome == "timeout":
                break
        # Served (the burst, 2, or one more on a slow machine), 5 refused by the limiter
        # (shield_after), then dropped.
        assert outcomes[-6:] == ["refused"] * 5 + ["timeout"], outcomes
        assert outcomes[:-6] in (["served"] * 2, ["served"] * 3), outcomes
        shielded_at = time.monotonic()
        entry = listed(topo)[f"{CLIENT4}/32"]
        assert (entry["source"], entry["reason"]) == (
            "ratelimit",
            "rate limited: 5 refusals in 10s (per_client)",
        )
        gw.wait_log(rf"shield: added {CLIENT4}/32 \(rate limited")
        before = accepted(topo)
        assert await attempt(topo, CLIENT4, GW_CLIENT_SIDE4) == "timeout"
        assert await attempt(topo, OTHER4, GW_CLIENT_SIDE4) == "served"  # others are served
        assert accepted(topo) == before + 1  # only the other client's connection
        assert listed(topo)[f"{CLIENT4}/32"]["drops"] >= 3  # a SYN and a retry, each time

        # After the TTL it is served again (its bucket refilled meanwhile).
        await trio.sleep(max(0.0, shielded_at + TTL + 0.3 - time.monotonic()))
        assert await attempt(topo, CLIENT4, GW_CLIENT_SIDE4, timeout=3) == "served"
        gw.wait_log(rf"shield: expired {CLIENT4}/32 \(rate limited", timeout=5)

        # --- acl deny of an IPv6 prefix ---------------------------------------------------
        assert listed(topo)[DENY6]["source"] == "acl"
        assert await attempt(topo, DENIED6, GW_CLIENT_SIDE6) == "timeout"
        code, out = shield("del", DENY6)
        assert code == 0, out
        # Its SYN is answered again; the acl refuses it in admit, with a reason.
        assert await attempt(topo, DENIED6, GW_CLIENT_SIDE6) == "refused"
        gw.wait_log(rf"refused by=acl/deny error='acl deny {re.escape(DENY6)}'")

        # --- an operator's entry, with a TTL ---------------------------------------------
        code, out = shield("add", OPERATOR4, "--ttl", "30s", "--reason", "e2e operator")
        assert code == 0, out
        assert await attempt(topo, OPERATOR4, GW_CLIENT_SIDE4) == "timeout"
        code, out = shield("list")
        assert code == 0, out
        line = next(li for li in out.splitlines() if li.startswith(f"{OPERATOR4}/32"))
        assert re.search(r"expires +[\d.]+s +drops +[1-9]\d*  admin: e2e operator", line), line
        entry = listed(topo)[f"{OPERATOR4}/32"]
        assert entry["drops"] >= 1 and 20 < entry["expires_in"] <= 30

        # --- never shielded ---------------------------------------------------------------
        code, out = shield("add", NEVER4, "--ttl", "1m")
        assert code == 1 and "never shielded" in out and "[shield] never" in out, out
        code, out = shield("add", BALANCER4, "--ttl", "1m")
        assert code == 1 and "proxy_protocol_trusted of listener lb" in out, out
        code, out = shield("add", "198.18.0.0/24", "--ttl", "1m")
        assert code == 1 and "the gateway's own address on gw-cli" in out, out
        assert f"{NEVER4}/32" not in listed(topo) and f"{BALANCER4}/32" not in listed(topo)

        status = json.loads(admin_get(topo, "/status"))["shield"]
        assert status["changes"]["add"] >= 3 and status["changes"]["expire"] >= 1
        assert status["changes"]["remove"] >= 1
        metrics = shield_metrics(topo)
        assert metrics[("l4gw_shield_changes_total", "expire")] >= 1
        assert metrics[("l4gw_shield_drops_total", "ratelimit")] >= 3
        assert metrics[("l4gw_shield_drops_total", "acl")] >= 2
        assert metrics[("l4gw_shield_packets_total", "dropped")] >= 8
        assert metrics[("l4gw_shield_entries", "")] == len(listed(topo))
        nursery.cancel_scope.cancel()
    assert gw.stop() == 0


async def test_workers_share_one_table(topology: Topology, gateway: StartGateway) -> None:
    """With workers = 2 the entry a worker adds is the gateway's: listed, logged and
    counted once, enforced by the kernel for every worker, removed once."""
    topo = topology
    text = config().replace("[shield]", "[gateway]\nworkers = 2\n\n[shield]", 1)
    text = text.replace("refusals = 5", "refusals = 2")
    gw = gateway(text, netns=topo.gateway)
    async with trio.open_nursery() as nursery:
        await nursery.start(backend, topo)
        outcomes = []
        for _ in range(20):  # each worker counts its own refusals: at most 2 x 2 of them
            outcomes.append(await attempt(topo, CLIENT4, GW_CLIENT_SIDE4))
            if outcomes[-1] == "timeout":
                break
        assert outcomes[-1] == "timeout" and outcomes.count("refused") <= 4, outcomes
        gw.wait_log(rf"shield: added {CLIENT4}/32")
        entry = listed(topo)[f"{CLIENT4}/32"]  # worker 0 serves /shield, whoever added it
        assert entry["source"] == "ratelimit"
        status = json.loads(admin_get(topo, "/status"))["shield"]
        assert status["entries"] == 2  # the flooder and the acl's prefix, once each
        assert status["changes"]["add"] == 2, status
        assert gw.log.count(f"shield: added {DENY6} ") == 1  # every worker applied the acl list
        assert gw.log.count(f"shield: added {CLIENT4}/32 ") == 1
        assert shield_metrics(topo)[("l4gw_shield_entries", "")] == 2
        done = l4gw("shield", "del", f"{CLIENT4}/32", "-c", str(gw.config_path), netns=topo.gateway)
        assert done.returncode == 0, done.stdout + done.stderr
        assert await attempt(topo, CLIENT4, GW_CLIENT_SIDE4) != "timeout"
        nursery.cancel_scope.cancel()
    assert gw.stop() == 0
