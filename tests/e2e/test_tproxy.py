"""TPROXY end to end: client, gateway (the router) and backend in three network namespaces.

A real ``l4gw run`` inside the gateway namespace receives connections to service
addresses that exist nowhere (198.18.2.0/24, fd00:2::/64) through TPROXY, and the
backends see the client as it is (``upstream_source = "client"``) or read it from a
PROXY header. State checks read the kernel with ``nft`` and ``ip`` directly, not
through l4gw's own code.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import proxy_protocol
from gateway.tproxy.nftables import Nftables, NftablesError

from gwproc import L4GW, GatewayProcess, l4gw, readable_l4gw
from netns import (
    BACKEND4,
    BACKEND6,
    CLIENT4,
    CLIENT6,
    ELSEWHERE4,
    ELSEWHERE6,
    GW_BACKEND_SIDE4,
    GW_BACKEND_SIDE6,
    GW_CLIENT_SIDE4,
    GW_CLIENT_SIDE6,
    Topology,
    inside,
    tcp_connect,
    tcp_listen,
)
from netns import topology as topology  # the fixture

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

SVC_A4, SVC_B4, SVC_A6, SVC_B6 = "198.18.2.10", "198.18.2.20", "fd00:2::10", "fd00:2::20"
NGINX_PORT, PEER_PORT, PP_PORT = 8080, 9090, 9191


def config(manage: bool = False, pp_version: str = "v2", extra: str = "") -> str:
    """Two transparent listeners (IPv4, IPv6), four service addresses routed to two
    backends per family, and [tproxy] intercepting 198.18.2-3.x / fd00:2-3:: port 80, 443."""
    return f"""
[gateway]
log_connections = true
drain_timeout = "1s"

[[listener]]
name = "tp4"
bind = "0.0.0.0:15001"
transparent = true

[[listener]]
name = "tp6"
bind = "[::]:15001"
transparent = true

[[route]]
name = "tls-a4"
listener = "tp4"
destination = ["{SVC_A4}/32"]
ports = [443]
sni = ["api.example.test"]
cluster = "pp4"

[[route]]
name = "tls-a6"
listener = "tp6"
destination = ["{SVC_A6}/128"]
ports = [443]
sni = ["api.example.test"]
cluster = "pp6"

[[route]]
name = "svc-a4"
listener = "tp4"
destination = ["{SVC_A4}/32"]
ports = [80]
cluster = "nginx4"

[[route]]
name = "svc-b4"
listener = "tp4"
destination = ["{SVC_B4}/32"]
cluster = "peer4"

[[route]]
name = "svc-a6"
listener = "tp6"
destination = ["{SVC_A6}/128"]
ports = [80]
cluster = "nginx6"

[[route]]
name = "svc-b6"
listener = "tp6"
destination = ["{SVC_B6}/128"]
cluster = "peer6"

[cluster.nginx4]
endpoints = ["{BACKEND4}:{NGINX_PORT}"]
upstream_source = "client"

[cluster.nginx6]
endpoints = ["[{BACKEND6}]:{NGINX_PORT}"]
upstream_source = "client"

[cluster.peer4]
endpoints = ["{BACKEND4}:{PEER_PORT}"]
upstream_source = "client"

[cluster.peer6]
endpoints = ["[{BACKEND6}]:{PEER_PORT}"]
upstream_source = "client"

[cluster.pp4]
endpoints = ["{BACKEND4}:{PP_PORT}"]
proxy_protocol = "{pp_version}"

[cluster.pp6]
endpoints = ["[{BACKEND6}]:{PP_PORT}"]
proxy_protocol = "{pp_version}"

[tproxy]
manage = {str(manage).lower()}

[[tproxy.intercept]]
listener = "tp4"
interfaces = ["gw-cli"]
destination = ["198.18.2.0/24", "198.18.3.0/24"]
ports = [80, 443]

[[tproxy.intercept]]
listener = "tp6"
interfaces = ["gw-cli"]
destination = ["fd00:2::/64", "fd00:3::/64"]
ports = [80, 443]
{extra}
"""


# --- backends and clients -------------------------------------------------------------------


@dataclass
class PeerServer:
    """Replies with one JSON line: the peer it accepted and the PROXY header it parsed."""

    name: str
    proxy_protocol: bool = False
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = stream.socket.getpeername()
            info: dict[str, Any] = {"name": self.name, "peer": [peer[0], peer[1]]}
            self.seen.append(info)
            try:
                rest = b""
                if self.proxy_protocol:
                    info["proxy"], rest = await self._read_header(stream)
                # Read to the client's EOF first: closing with unread bytes would reset.
                info["received"] = len(rest) + len(await _receive_all(stream))
                await stream.send_all(json.dumps(info).encode() + b"\n")
            except trio.BrokenResourceError:
                pass

    async def _read_header(self, stream: trio.SocketStream) -> tuple[dict[str, Any] | str, bytes]:
        """The parsed header and the bytes read after it."""
        buf = b""
        while True:
            try:
                result = proxy_protocol.parse(buf)
            except proxy_protocol.ProxyProtocolError as exc:
                return f"error: {exc}", buf
            if not isinstance(result, int):
                header = {
                    "version": result.version,
                    "source": list(result.source or ()),
                    "destination": list(result.destination or ()),
                    "authority": result.tlv(proxy_protocol.PP2_TYPE_AUTHORITY) is not None
                    and result.authority,
                }
                return header, buf[result.length :]
            chunk = await stream.receive_some(result - len(buf))
            if not chunk:
                return "error: EOF inside the header", buf
            buf += chunk


async def _receive_all(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes:
    data = b""
    with trio.fail_after(10):
        while len(data) < limit and (chunk := await stream.receive_some(65536)):
            data += chunk
    return data


async def serve(
    nursery: trio.Nursery, ns: str, server: PeerServer, *binds: tuple[str, int]
) -> None:
    for host, port in binds:
        listener = tcp_listen(ns, host, port)
        nursery.start_soon(trio.serve_listeners, server.handle, [listener])


async def exchange(
    ns: str, host: str, port: int, send: bytes = b""
) -> tuple[tuple[str, int], bytes]:
    """Connect from ``ns``, send, half-close, read to EOF: (our local address, the reply)."""
    stream = await tcp_connect(ns, host, port)
    async with stream:
        local = stream.socket.getsockname()
        if send:
            await stream.send_all(send)
        await stream.send_eof()
        chunks = []
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return (local[0], local[1]), b"".join(chunks)


async def ask(
    ns: str, host: str, port: int, send: bytes = b""
) -> tuple[tuple[str, int], dict[str, Any]]:
    local, reply = await exchange(ns, host, port, send)
    return local, json.loads(reply)


async def refused_or_closed(ns: str, host: str, port: int) -> bytes:
    """What a client gets from a connection the gateway refuses: b"" (EOF) or b"reset"."""
    try:
        _, reply = await exchange(ns, host, port, b"hello")
    except (OSError, trio.BrokenResourceError):
        return b"reset"
    return reply


def client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


class Nginx:
    """nginx in the backend namespace: own config, pid and logs in a temp dir; killed by the
    topology's teardown (it is started through ``Topology.popen``)."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.dir = workdir / "nginx"
        self.dir.mkdir()
        self.access_log = self.dir / "access.log"
        d = self.dir
        temp = " ".join(
            f"{kind}_temp_path {d}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (d / "nginx.conf").write_text(
            f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format peer '$remote_addr $remote_port -> $server_addr:$server_port "$request" $status';
    access_log {d}/access.log peer;
    {temp}
    server {{
        listen {BACKEND4}:{NGINX_PORT};
        listen [{BACKEND6}]:{NGINX_PORT};
        location / {{ default_type text/plain; return 200 "$remote_addr\\n"; }}
    }}
}}
"""
        )
        self.proc = topo.popen(
            topo.backend,
            "nginx",
            "-e",
            str(d / "error.log"),
            "-p",
            str(d),
            "-c",
            str(d / "nginx.conf"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready(topo)

    def _wait_ready(self, topo: Topology) -> None:
        deadline = time.monotonic() + 10
        for host in (BACKEND4, BACKEND6):
            while True:
                with inside(topo.backend):
                    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                with probe:
                    if probe.connect_ex((host, NGINX_PORT)) == 0:
                        break
                assert self.proc.poll() is None, (self.dir / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []


# --- kernel state, read with nft and ip -----------------------------------------------------


def _strip_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_strip_handles(v) for v in value]
    return value


def kernel_state(topo: Topology) -> dict[str, Any]:
    """The gateway namespace's nftables ruleset, ip rules and routes tagged proto 244 or in
    table 100 (handles stripped: they change on every atomic replace)."""
    gw = topo.gateway
    nft = json.loads(topo.exec(gw, "nft", "-j", "list", "ruleset", check=True).stdout)
    state: dict[str, Any] = {
        "nft": [_strip_handles(item) for item in nft["nftables"] if "metainfo" not in item]
    }
    for v in ("4", "6"):
        rules = json.loads(topo.exec(gw, "ip", "-j", f"-{v}", "rule", check=True).stdout)
        state[f"rules{v}"] = [
            r for r in rules if r.get("table") not in ("local", "main", "default")
        ]
        routes = json.loads(
            topo.exec(gw, "ip", "-j", f"-{v}", "route", "show", "table", "all", check=True).stdout
        )
        state[f"routes{v}"] = [
            r for r in routes if r.get("protocol") == "244" or r.get("table") == "100"
        ]
    return state


def assert_set_up(state: dict[str, Any], mark: str = "0x1", table: str = "100") -> None:
    tables = [i["table"] for i in state["nft"] if "table" in i]
    assert tables == [{"family": "inet", "name": "l4gw"}]
    comments = [i["rule"]["comment"] for i in state["nft"] if "rule" in i]
    assert len(comments) == 5 and all(c.startswith("l4gw ") for c in comments)
    assert any("tproxy" in json.dumps(i) for i in state["nft"] if "rule" in i)
    for v in ("4", "6"):
        assert state[f"rules{v}"] == [
            {"priority": 10000, "src": "all", "fwmark": mark, "table": table, "protocol": "244"}
        ]
        assert [(r["type"], r["dst"], r["dev"], r.get("table")) for r in state[f"routes{v}"]] == [
            ("local", "default", "lo", table)
        ]


def assert_clean(state: dict[str, Any]) -> None:
    assert state == {"nft": [], "rules4": [], "rules6": [], "routes4": [], "routes6": []}


def tproxy(
    topo: Topology, gw: GatewayProcess, action: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return l4gw("tproxy", action, "-c", str(gw.config_path), *extra, netns=topo.gateway)


def hostport(host: str, port: int) -> str:
    """An address as the gateway's log writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


StartGateway = Callable[..., GatewayProcess]


# --- tests ----------------------------------------------------------------------------------


async def test_intercepted_clients_reach_backends_as_themselves(
    topology: Topology, gateway: StartGateway, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Client -> service address (not the gateway) -> TPROXY -> l4gw -> backend, which sees the
    client's own IP (nginx and a trio server; IPv4 and IPv6); two services, two clusters; the
    gateway logs the real client and the original destination; [tproxy] manage = true sets up
    at start and tears down at exit."""
    topo = topology
    nginx = Nginx(topo, tmp_path)
    peers = PeerServer("peer")
    await serve(nursery, topo.backend, peers, (BACKEND4, PEER_PORT), (BACKEND6, PEER_PORT))
    gw = gateway(config(manage=True), netns=topo.gateway)
    assert_set_up(kernel_state(topo))

    for svc_a, svc_b, client in ((SVC_A4, SVC_B4, CLIENT4), (SVC_A6, SVC_B6, CLIENT6)):
        local, body = await exchange(topo.client, svc_a, 80, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert local[0] == client
        assert body.startswith(b"HTTP/1.1 200") and body.endswith(f"\r\n\r\n{client}\n".encode())
        local_b, reply = await ask(topo.client, svc_b, 80, b"hi")
        assert reply["name"] == "peer" and reply["peer"][0] == client
        for local_addr, svc, route in ((local, svc_a, "svc-a"), (local_b, svc_b, "svc-b")):
            pattern = (
                rf"client={re.escape(hostport(*local_addr))} dst={re.escape(hostport(svc, 80))} "
                rf"route={route}{'6' if ':' in client else '4'} "
            )
            await trio.to_thread.run_sync(gw.wait_log, pattern)

    lines = nginx.log_lines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{CLIENT4} ") and f"-> {BACKEND4}:{NGINX_PORT}" in lines[0]
    assert lines[1].startswith(f"{CLIENT6} ") and f"-> {BACKEND6}:{NGINX_PORT}" in lines[1]
    assert [p["peer"][0] for p in peers.seen] == [CLIENT4, CLIENT6]

    assert gw.stop() == 0
    assert "tproxy: torn down" in gw.log
    assert_clean(kernel_state(topo))


@pytest.mark.parametrize("version", ["v2", "v1"])
async def test_proxy_protocol_carries_client_destination_and_sni(
    topology: Topology, gateway: StartGateway, nursery: trio.Nursery, version: str
) -> None:
    """The backend parses the PROXY header (gateway.proxy_protocol.parse) and finds the client's
    IP and port and the original destination; v2 carries the peeked SNI as AUTHORITY."""
    topo = topology
    backend = PeerServer("pp", proxy_protocol=True)
    await serve(nursery, topo.backend, backend, (BACKEND4, PP_PORT), (BACKEND6, PP_PORT))
    gw = gateway(config(pp_version=version), netns=topo.gateway)
    assert tproxy(topo, gw, "setup").returncode == 0
    hello = client_hello("api.example.test")
    for svc, client in ((SVC_A4, CLIENT4), (SVC_A6, CLIENT6)):
        local, reply = await ask(topo.client, svc, 443, hello)
        assert local[0] == client
        header = reply["proxy"]
        assert header["version"] == int(version[1])
        assert header["source"] == [client, local[1]]
        assert header["destination"] == [svc, 443]
        assert header["authority"] == ("api.example.test" if version == "v2" else False)
        # Without transparent upstream the backend's peer is the gateway itself.
        assert reply["peer"][0] in (GW_BACKEND_SIDE4, GW_BACKEND_SIDE6)
    await trio.to_thread.run_sync(gw.wait_log, r"conn \d+ tp6 .* route=tls-a6 ")


async def test_no_route_is_refused_and_never_connected(
    topology: Topology, gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """An intercepted destination that no route allows: refused (no_route, logged), and nothing
    connects to that destination, which is real and reachable."""
    topo = topology
    elsewhere = PeerServer("elsewhere")
    await serve(nursery, topo.backend, elsewhere, (ELSEWHERE4, 80), (ELSEWHERE6, 80))
    # Without interception, the router forwards the client there: the listener counts it.
    for host, client in ((ELSEWHERE4, CLIENT4), (ELSEWHERE6, CLIENT6)):
        _, reply = await ask(topo.client, host, 80)
        assert reply["peer"][0] == client
    assert len(elsewhere.seen) == 2

    gw = gateway(config(), netns=topo.gateway)
    assert tproxy(topo, gw, "setup").returncode == 0
    for host in (ELSEWHERE4, ELSEWHERE6):
        assert await refused_or_closed(topo.client, host, 80) in (b"", b"reset")
    text = await trio.to_thread.run_sync(gw.wait_log, r"no_route by=core", 10, 2)
    assert re.search(
        rf"client={CLIENT4}:\d+ dst={ELSEWHERE4}:80 route=- endpoint=- .* no_route", text
    )
    assert re.search(rf"client=\[{CLIENT6}\]:\d+ dst=\[{ELSEWHERE6}\]:80 route=- .* no_route", text)
    assert len(elsewhere.seen) == 2


async def test_setup_twice_status_teardown(topology: Topology, tmp_path: Path) -> None:
    """setup, setup again (same state), status (matches), a changed config (converges),
    teardown (nothing of ours left), teardown again (nothing to do)."""
    topo = topology
    gw = GatewayProcess(tmp_path, config(), netns=topo.gateway)  # the config file only
    assert_clean(kernel_state(topo))
    status = tproxy(topo, gw, "status")
    assert status.returncode == 1 and "not installed" in status.stdout

    first = tproxy(topo, gw, "setup")
    assert first.returncode == 0, first.stderr
    assert "created nftables table inet l4gw" in first.stdout
    after_first = kernel_state(topo)
    assert_set_up(after_first)
    second = tproxy(topo, gw, "setup")
    assert second.returncode == 0 and "added" not in second.stdout
    assert kernel_state(topo) == after_first

    status = tproxy(topo, gw, "status")
    assert status.returncode == 0, status.stdout
    assert f"status: matches {gw.config_path}" in status.stdout
    assert status.stdout.count("installed  ") == 4

    gw.write_config(config().replace("manage = false", "manage = false\nmark = 7\ntable = 200"))
    status = tproxy(topo, gw, "status")
    assert status.returncode == 1 and "STALE" in status.stdout and "MISSING" in status.stdout
    changed = tproxy(topo, gw, "setup")
    assert changed.returncode == 0, changed.stderr
    assert "removed stale ip -4 rule fwmark 0x1 lookup 100" in changed.stdout
    assert_set_up(kernel_state(topo), mark="0x7", table="200")

    down = tproxy(topo, gw, "teardown")
    assert down.returncode == 0 and "removed nftables table inet l4gw" in down.stdout
    assert_clean(kernel_state(topo))
    again = tproxy(topo, gw, "teardown")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


async def test_kill9_leftovers_cleaned_by_teardown_and_by_next_start(
    topology: Topology, gateway: StartGateway, tmp_path: Path
) -> None:
    topo = topology
    reference = GatewayProcess(tmp_path, config(manage=True), name="ref", netns=topo.gateway)
    assert tproxy(topo, reference, "setup").returncode == 0
    expected = kernel_state(topo)
    assert tproxy(topo, reference, "teardown").returncode == 0

    gw = gateway(config(manage=True), name="gw1", netns=topo.gateway)
    assert kernel_state(topo) == expected
    assert gw.proc is not None
    gw.proc.kill()
    gw.wait()
    assert kernel_state(topo) == expected  # SIGKILL: nothing ran at exit
    # Fail closed: with the rules left and no gateway, clients are reset, not routed onward.
    assert await refused_or_closed(topo.client, SVC_B4, 80) == b"reset"

    # The next start converges from the leftovers: the same state as one clean setup.
    gw2 = gateway(config(manage=True), name="gw2", netns=topo.gateway)
    assert kernel_state(topo) == expected
    assert gw2.proc is not None
    gw2.proc.kill()
    gw2.wait()

    # Also when the next start runs another config: what the killed one left is removed.
    other = config(manage=True).replace("manage = true", "manage = true\nmark = 7\ntable = 200")
    gw2 = gateway(other, name="gw3", netns=topo.gateway)
    assert_set_up(kernel_state(topo), mark="0x7", table="200")
    assert "removed stale ip -4 rule fwmark 0x1 lookup 100 priority 10000" in gw2.log
    assert gw2.proc is not None
    gw2.proc.kill()
    gw2.wait()

    down = tproxy(topo, gw2, "teardown")
    assert down.returncode == 0, down.stderr
    assert down.stdout.count("removed ") == 5  # the table, 2 rules, 2 routes
    assert_clean(kernel_state(topo))


async def test_doctor_finds_each_seeded_misconfiguration(
    topology: Topology, gateway: StartGateway
) -> None:
    """Clean on a good setup; each seeded problem reported as FAIL with a one-line fix; clean
    again once they are repaired."""
    topo = topology
    gw = gateway(config(), netns=topo.gateway)
    assert tproxy(topo, gw, "setup").returncode == 0

    def doctor(expect_ok: bool) -> str:
        result = tproxy(topo, gw, "doctor")
        assert (result.returncode == 0) == expect_ok, result.stdout + result.stderr
        return result.stdout

    well = doctor(True)
    assert "doctor: all well" in well
    assert "listener tp6 ([::]:15001): listening, transparent" in well

    def run(*argv: str) -> Callable[[], object]:
        return lambda: topo.exec(topo.gateway, *argv, check=True)

    def sysctl(key: str, value: str) -> Callable[[], object]:
        return lambda: topo.sysctl(topo.gateway, key, value)

    mangle = (
        "add table ip mangle; add chain ip mangle pre { type filter hook prerouting priority -150; "
        "}; add rule ip mangle pre tcp dport 80 tproxy to :15999"
    )
    legacy_rule = ["PREROUTING", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "TPROXY"]
    legacy_rule += ["--on-port", "15999", "--on-ip", "0.0.0.0", "--tproxy-mark", "0x1/0x1"]
    # (what doctor must say, what its fix line must say, seed, repair)
    seeds: list[tuple[str, str, Callable[[], object], Callable[[], object]]] = [
        (
            "IPv4 fwmark rule missing",
            "ip -4 rule add fwmark 0x1 lookup 100 priority 10000",
            run("ip", "-4", "rule", "del", "fwmark", "1", "lookup", "100", "priority", "10000"),
            lambda: tproxy(topo, gw, "setup"),
        ),
        (
            "IPv6 local route missing",
            "ip -6 route add local default dev lo table 100",
            run("ip", "-6", "route", "del", "local", "default", "dev", "lo", "table", "100"),
            lambda: None,  # the setup above repairs it too
        ),
        (
            "rp_filter=1 (strict) on gw-cli",
            "sysctl -w net.ipv4.conf.gw-cli.rp_filter=2",
            sysctl("net.ipv4.conf.gw-cli.rp_filter", "1"),
            sysctl("net.ipv4.conf.gw-cli.rp_filter", "0"),
        ),
        (
            "src_valid_mark=1 on gw-be",
            "net.ipv4.conf.all.src_valid_mark=0",
            sysctl("net.ipv4.conf.all.src_valid_mark", "1"),
            sysctl("net.ipv4.conf.all.src_valid_mark", "0"),
        ),
        (
            "IPv6 forwarding is off",
            "sysctl -w net.ipv6.conf.all.forwarding=1",
            sysctl("net.ipv6.conf.all.forwarding", "0"),
            sysctl("net.ipv6.conf.all.forwarding", "1"),
        ),
        (
            "conflict: nftables table ip mangle also does TPROXY",
            "nft delete table ip mangle",
            run("nft", mangle),
            run("nft", "delete", "table", "ip", "mangle"),
        ),
        (
            # x_tables rules are invisible to nft; x_tables is per network namespace.
            "conflict: IPv4 iptables-legacy mangle rule does TPROXY too",
            "iptables-legacy -t mangle -D PREROUTING -p tcp -m tcp --dport 80 -j TPROXY",
            run("iptables-legacy", "-t", "mangle", "-A", *legacy_rule),
            run("iptables-legacy", "-t", "mangle", "-D", *legacy_rule),
        ),
        (
            "conflict: IPv4 ip rule priority 10000 is also used",
            "rule_priority",
            run("ip", "-4", "rule", "add", "priority", "10000", "lookup", "main"),
            run("ip", "-4", "rule", "del", "priority", "10000", "lookup", "main"),
        ),
    ]
    for _, _, seed, _ in seeds:
        seed()
    lines = doctor(False).splitlines()
    for problem, fix, _, _ in seeds:
        found = [i for i, line in enumerate(lines) if line.startswith("FAIL") and problem in line]
        assert found, (problem, lines)
        fix_line = lines[found[0] + 1].strip()
        assert fix_line.startswith("fix: ") and fix in fix_line, (problem, fix_line)
    for _, _, _, repair in reversed(seeds):
        repair()
    assert "doctor: all well" in doctor(True)

    # Without CAP_NET_ADMIN (bounding set dropped before exec).
    command = shlex.join([*L4GW, "tproxy", "doctor", "-c", str(gw.config_path)])
    nocap = topo.exec(topo.gateway, "capsh", "--drop=cap_net_admin", "--", "-c", command)
    assert nocap.returncode == 1
    assert "FAIL  CAP_NET_ADMIN: missing" in nocap.stdout

    # A listener that is not transparent holding the port.
    gw.stop()
    with inside(topo.gateway):
        plain = socket.socket()
    with plain:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        plain.bind(("0.0.0.0", 15001))
        plain.listen()
        out = doctor(False)
        assert (
            "FAIL  listener tp4 (0.0.0.0:15001): the socket listening there is not transparent"
            in out
        )
    out = doctor(True)  # nothing listens: a warning, not a failure
    assert "warn  listener tp4 (0.0.0.0:15001): nothing listens yet" in out


async def test_bad_proxy_headers_are_refused_and_the_gateway_keeps_serving(
    topology: Topology, gateway: StartGateway, nursery: trio.Nursery
) -> None:
    topo = topology
    backend = PeerServer("plain")
    await serve(nursery, topo.backend, backend, (BACKEND4, PEER_PORT))
    extra = f"""
[[listener]]
name = "pp4"
bind = "{GW_CLIENT_SIDE4}:7000"
proxy_protocol = true
proxy_protocol_trusted = ["{CLIENT4}/32"]
peek_timeout = "2s"

[[listener]]
name = "pp6"
bind = "[{GW_CLIENT_SIDE6}]:7000"
proxy_protocol = true
proxy_protocol_trusted = ["{CLIENT4}/32"]

[[route]]
name = "pp4"
listener = "pp4"
cluster = "plain"

[[route]]
name = "pp6"
listener = "pp6"
cluster = "plain"

[cluster.plain]
endpoints = ["{BACKEND4}:{PEER_PORT}"]
"""
    gw = gateway(config(extra=extra), netns=topo.gateway)
    good = proxy_protocol.encode_v2(("198.18.0.99", 5555), ("198.18.2.99", 443))
    cases = [
        ("truncated", good[:20], GW_CLIENT_SIDE4, "bad PROXY header: "),
        (
            "bad signature",
            b"GET / HTTP/1.0\r\n\r\n",
            GW_CLIENT_SIDE4,
            "no PROXY protocol signature",
        ),
        (
            "v2 length over the cap",
            proxy_protocol.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 0xFFFF),
            GW_CLIENT_SIDE4,
            "v2 length over limit",
        ),
        (
            "v2 unknown family",
            proxy_protocol.V2_SIGNATURE + b"\x21\x41" + struct.pack("!H", 12) + bytes(12),
            GW_CLIENT_SIDE4,
            "v2 unknown address family",
        ),
        (
            "v1 IPv6 address in a TCP4 line",
            b"PROXY TCP4 fd00::2 198.18.2.99 5555 443\r\n",
            GW_CLIENT_SIDE4,
            "v1 bad IPv4 address",
        ),
        ("untrusted source", good, GW_CLIENT_SIDE6, f"untrusted source {CLIENT6}"),
    ]
    for n, (what, data, host, reason) in enumerate(cases, 1):
        try:
            _, reply = await exchange(topo.client, host, 7000, data)
        except (OSError, trio.BrokenResourceError):
            reply = b"reset"
        assert reply in (b"", b"reset"), what
        text = await trio.to_thread.run_sync(gw.wait_log, r"bad_proxy_header", 10, n)
        last = [line for line in text.splitlines() if "bad_proxy_header" in line][-1]
        assert reason in last, (what, last)
    assert backend.seen == []

    # Still serving: a good header is consumed and its addresses are the flow's.
    _, reply = await ask(topo.client, GW_CLIENT_SIDE4, 7000, good + b"payload")
    assert reply["peer"][0] == GW_BACKEND_SIDE4
    await trio.to_thread.run_sync(
        gw.wait_log, r"conn \d+ pp4 client=198\.18\.0\.99:5555 dst=198\.18\.2\.99:443 route=pp4"
    )


def test_nftables_binding_errors_carry_nfts_message_and_change_nothing(topology: Topology) -> None:
    with inside(topology.gateway), Nftables() as nft:
        table = {"family": "inet", "name": "l4gw-binding-test"}
        with pytest.raises(NftablesError, match="No such file or directory"):
            nft.run(
                [
                    {"add": {"table": table}},
                    {"add": {"chain": {"family": "inet", "table": "absent", "name": "c"}}},
                ]
            )
        # One transaction: the table of the failed batch was not created either.
        assert not [i for i in nft.ruleset() if "table" in i]
        nft.run([{"add": {"table": table}}])
        assert [i["table"]["name"] for i in nft.ruleset() if "table" in i] == ["l4gw-binding-test"]
        with pytest.raises(NftablesError):
            nft.run([{"bogus": {}}])


# --- ownership and the guard (issue 13) -----------------------------------------------------

ADMIN_PORT = 9901


def owned_config(workers: int = 1, admin: bool = True, **tproxy: str) -> str:
    """:func:`config` with manage = true, a short check_interval, the admin endpoint (in the
    gateway namespace's loopback) and ``workers`` processes."""
    keys = {"check_interval": '"200ms"', **tproxy}
    text = config(manage=True, extra=f'\n[admin]\nbind = "127.0.0.1:{ADMIN_PORT}"\n' * admin)
    text = text.replace(
        "manage = true\n", "manage = true\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    )
    return text.replace("[gateway]\n", f"[gateway]\nworkers = {workers}\n", 1)


@pytest.fixture(autouse=True)
def _no_lock_files_left(request: pytest.FixtureRequest) -> Any:
    """Remove the ownership lock files of the test's gateway namespace, whatever happened
    (a gateway killed with SIGKILL leaves its lock file: that is by design)."""
    if "topology" not in request.fixturenames:
        yield
        return
    # Asked for here, so that this fixture ends before the namespace goes.
    path = lock_file(request.getfixturevalue("topology"))
    yield
    for suffix in (".lock", ".forced"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def lock_file(topo: Topology) -> Path:
    return Path(f"/run/l4gw/tproxy-{(Path('/run/netns') / topo.gateway).stat().st_ino}.lock")


async def admin_get(topo: Topology, path: str) -> bytes:
    """GET ``path`` from the admin endpoint on the gateway namespace's loopback: the body."""
    _, reply = await exchange(
        topo.gateway,
        "127.0.0.1",
        ADMIN_PORT,
        f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    return body


def metric(text: bytes, name: str) -> float | None:
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text.decode(), re.M)
    return None if m is None else float(m.group(1))


async def intercepted(topo: Topology, gw: GatewayProcess, count: int) -> None:
    """A connection to a service address reaches the peer backend through ``gw`` (its
    ``count``-th logged connection to svc-b4)."""
    local, reply = await ask(topo.client, SVC_B4, 80, b"hi")
    assert reply["name"] == "peer" and reply["peer"][0] == CLIENT4
    await trio.to_thread.run_sync(gw.wait_log, r"route=svc-b4 ", 10, count)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timeout waiting for {what}")


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_start_touches_nothing_of_the_running_owner(
    topology: Topology, gateway: StartGateway, nursery: trio.Nursery, tmp_path: Path, workers: int
) -> None:
    """A second ``l4gw run`` of the same file in the same namespace exits 1 with one line
    naming the owner, and changes nothing: the first one's table, rules and routes stay,
    intercepted connections still go through it, and it tears down at its own exit."""
    topo = topology
    peers = PeerServer("peer")
    await serve(nursery, topo.backend, peers, (BACKEND4, PEER_PORT))
    # No admin endpoint: the second start would fail on the listener port, as in the issue.
    a = gateway(owned_config(workers, admin=False), name="a", netns=topo.gateway)
    assert a.proc is not None
    before = kernel_state(topo)
    assert_set_up(before)
    await intercepted(topo, a, 1)

    b = GatewayProcess(tmp_path, "", name="b", netns=topo.gateway)
    b.config_path = a.config_path  # the same file
    try:
        b.start(wait_ready=False)
        assert await trio.to_thread.run_sync(b.wait) == 1
    finally:
        b.stop()
    lines = [line for line in b.log.splitlines() if "tproxy" in line or " ERROR " in line]
    assert len(lines) == 1, b.log
    assert " ERROR " in lines[0] and "owned by a running gateway" in lines[0]
    assert f"pid {a.proc.pid}, config {a.config_path}, since " in lines[0]
    assert "ready: " not in b.log

    assert kernel_state(topo) == before
    await intercepted(topo, a, 2)
    assert "torn down" not in a.log and "restored" not in a.log

    assert a.stop() == 0
    assert "tproxy: torn down" in a.log
    assert_clean(kernel_state(topo))
    assert not lock_file(topo).exists()


@pytest.mark.parametrize(("workers", "user"), [(1, ""), (2, ""), (1, "nobody")])
async def test_guard_restores_what_was_removed_and_says_so(
    topology: Topology,
    gateway: StartGateway,
    nursery: trio.Nursery,
    readable_by_nobody: None,
    workers: int,
    user: str,
) -> None:
    """The owner notices its table, an ip rule and a route removed, and its chain flushed, by
    hand: each time an ERROR names the difference, the state is restored to what it set up,
    ``l4gw.tproxy.restored`` counts it (``/metrics``), ``/status`` and ``l4gw tproxy status``
    show it, and interception works again. Also after dropping to ``[gateway] user`` with
    only CAP_NET_ADMIN left (capabilities are per thread: the guard's threads must have it)."""
    topo = topology
    peers = PeerServer("peer")
    await serve(nursery, topo.backend, peers, (BACKEND4, PEER_PORT))
    text = owned_config(workers)
    if user:
        text = text.replace("[gateway]\n", f'[gateway]\nuser = "{user}"\n', 1)
    a = gateway(text, name="a", netns=topo.gateway, **(readable_l4gw() if user else {}))
    if user:
        assert "running as nobody:nogroup" in a.log and "capabilities: CAP_NET_ADMIN" in a.log
    before = kernel_state(topo)
    assert_set_up(before)

    tampering = [
        (["nft", "delete", "table", "inet", "l4gw"], ["nftables table inet l4gw is missing"]),
        (
            ["ip", "-4", "rule", "del", "fwmark", "1", "lookup", "100", "priority", "10000"],
            ["missing: ip -4 rule fwmark 0x1 lookup 100 priority 10000"],
        ),
        (
            ["ip", "-6", "route", "del", "local", "default", "dev", "lo", "table", "100"],
            ["missing: ip -6 route local default dev lo table 100"],
        ),
        (["nft", "flush", "chain", "inet", "l4gw", "prerouting"], ["rules differ from the config"]),
    ]
    for n, (argv, named) in enumerate(tampering, 1):
        topo.exec(topo.gateway, *argv, check=True)
        text = await trio.to_thread.run_sync(a.wait_log, r"tproxy: restored", 10, n)
        errors = [line for line in text.splitlines() if "no longer matches" in line]
        assert len(errors) == n and " ERROR " in errors[-1], text
        assert all(what in errors[-1] for what in named), errors[-1]
        await wait_until(lambda: kernel_state(topo) == before, "the state as set up")
        await intercepted(topo, a, n)

        metrics = await admin_get(topo, "/metrics")
        assert metric(metrics, "l4gw_tproxy_restored_total") == n, metrics.decode()
        assert metric(metrics, "l4gw_tproxy_intact") == 1

    status = json.loads(await admin_get(topo, "/status"))["tproxy"]
    assert status["restored"] == 4 and status["intact"] is True
    assert status["config"] == str(a.config_path) and status["check_interval"] == 0.2
    shown = tproxy(topo, a, "status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "restored 4 times" in shown.stdout and "rules differ" in shown.stdout
    assert a.proc is not None and f"owner: running gateway pid {a.proc.pid}, " in shown.stdout


@pytest.mark.parametrize("workers", [1, 2])
async def test_owner_killed_next_start_takes_over(
    topology: Topology, gateway: StartGateway, workers: int
) -> None:
    """kill -9 leaves the state (fail closed) and, once the last process is gone (workers
    die with their supervisor, after their drain), a lock nobody holds: status says no
    live gateway owns it, the next start takes it over, converges and guards it."""
    topo = topology
    a = gateway(owned_config(workers), name="a", netns=topo.gateway)
    expected = kernel_state(topo)
    assert a.proc is not None
    a.proc.kill()
    a.wait()

    def released() -> bool:
        return "owner: none" in tproxy(topo, a, "status").stdout

    await wait_until(released, "the kernel to release the lock")
    assert kernel_state(topo) == expected
    assert lock_file(topo).exists()  # history, not an owner
    shown = tproxy(topo, a, "status")
    assert shown.returncode == 0
    assert "owner: none: no running gateway owns" in shown.stdout
    assert f"the last one, pid {a.proc.pid} with {a.config_path}, is gone" in shown.stdout

    c = gateway(owned_config(workers), name="c", netns=topo.gateway)
    assert c.proc is not None
    assert "tproxy: set up" in c.log and "owned by" not in c.log
    assert kernel_state(topo) == expected
    shown = tproxy(topo, c, "status")
    assert f"owner: running gateway pid {c.proc.pid}, config {c.config_path}" in shown.stdout
    topo.exec(topo.gateway, "nft", "delete", "table", "inet", "l4gw", check=True)
    await trio.to_thread.run_sync(c.wait_log, r"tproxy: restored")
    await wait_until(lambda: kernel_state(topo) == expected, "the state as set up")
    assert c.stop() == 0
    assert_clean(kernel_state(topo))


async def test_teardown_and_setup_refuse_while_owned_force_takes_over(
    topology: Topology, gateway: StartGateway
) -> None:
    """``l4gw tproxy teardown`` and ``setup`` refuse while a live gateway owns the state and
    change nothing; ``teardown --force`` removes it, and the gateway stops guarding it
    (it does not restore it) and leaves it alone at exit."""
    topo = topology
    a = gateway(owned_config(), name="a", netns=topo.gateway)
    assert a.proc is not None
    before = kernel_state(topo)
    for action in ("teardown", "setup"):
        refused = tproxy(topo, a, action)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"tproxy {action}: refused: " in refused.stderr
        assert f"pid {a.proc.pid}, config {a.config_path}" in refused.stderr
        assert "--force" in refused.stderr
        assert kernel_state(topo) == before

    forced = tproxy(topo, a, "teardown", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "removed nftables table inet l4gw" in forced.stdout
    assert f"forced: the gateway that owns the state (pid {a.proc.pid}" in forced.stdout
    await trio.to_thread.run_sync(a.wait_log, r"took the TPROXY state over")
    shown = tproxy(topo, a, "status")
    assert "guard: stood down: l4gw tproxy teardown --force" in shown.stdout
    # The guard has ended: nothing restores the state the operator removed.
    assert_clean(kernel_state(topo))
    assert "restored" not in a.log

    assert a.stop() == 0
    assert "tproxy: not torn down: l4gw tproxy teardown --force" in a.log
    assert_clean(kernel_state(topo))
    # With no owner left, both work without --force again.
    assert tproxy(topo, a, "setup").returncode == 0
    assert tproxy(topo, a, "teardown").returncode == 0
    assert_clean(kernel_state(topo))


async def test_reload_applies_a_changed_tproxy_and_guards_that(
    topology: Topology, gateway: StartGateway
) -> None:
    """SIGHUP with another mark and table: the owner applies them and from then on guards
    (and restores) the new plan, not the start-up one. A reloaded plan that conflicts, or a
    file without manage = true, leaves the installed state as it is, still guarded."""
    topo = topology
    a = gateway(owned_config(), name="a", netns=topo.gateway)
    assert_set_up(kernel_state(topo))

    a.write_config(owned_config(mark="7", table="200"))
    a.signal(signal.SIGHUP)
    await trio.to_thread.run_sync(a.wait_log, r"tproxy: applied the changed \[tproxy\]")
    changed = kernel_state(topo)
    assert_set_up(changed, mark="0x7", table="200")
    topo.exec(topo.gateway, "nft", "delete", "table", "inet", "l4gw", check=True)
    await trio.to_thread.run_sync(a.wait_log, r"tproxy: restored")
    await wait_until(lambda: kernel_state(topo) == changed, "the reloaded plan restored")

    # A foreign ip rule where the next reload wants ours: refused, the installed one stays.
    topo.exec(topo.gateway, "ip", "-4", "rule", "add", "priority", "20000", "lookup", "main")
    try:
        a.write_config(owned_config(mark="7", table="200", rule_priority="20000"))
        a.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(a.wait_log, r"was not applied: .*priority 20000")
    finally:
        topo.exec(topo.gateway, "ip", "-4", "rule", "del", "priority", "20000", "lookup", "main")
    a.write_config(owned_config(mark="7", table="200").replace("manage = true", "manage = false"))
    a.signal(signal.SIGHUP)
    await trio.to_thread.run_sync(a.wait_log, r"has no \[tproxy\] manage = true")
    topo.exec(topo.gateway, "ip", "-4", "rule", "del", "fwmark", "7", "lookup", "200")
    await trio.to_thread.run_sync(a.wait_log, r"tproxy: restored", 10, 2)
    await wait_until(lambda: kernel_state(topo) == changed, "the reloaded plan restored")

    assert a.stop() == 0
    assert_clean(kernel_state(topo))


def test_guard_reads_the_same_state_as_the_full_read(topology: Topology, tmp_path: Path) -> None:
    """read_own (our table, rules, and a kernel-filtered dump of our routes) sees what
    read_state sees, for a table id past 255 too, and a missing table as missing."""
    from gateway import config as config_mod
    from gateway.tproxy import plan as tplan
    from gateway.tproxy import state as tp
    gw = GatewayProcess(tmp_path, config().replace("manage = false", "table = 100000"))
    cfg = config_mod.load(str(gw.config_path), {})
    p = tplan.plan(cfg)
    with inside(topology.gateway):
        tp.apply(cfg)
        try:
            # A route of someone else's in our table is not ours.
            foreign = ["ip", "route", "add", "local", "198.18.9.9", "dev", "lo", "table", "100000"]
            subprocess.run(foreign, check=True)
            own = tp.read_own(p)
            with Nftables() as nft:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    full = tp.read_state(nft, ipr)
            assert own.table and own.rule_comments == full.rule_comments
            assert own.chains == full.chains and own.ip_rules == full.ip_rules
            assert sorted(map(str, own.routes)) == sorted(map(str, full.routes))
            assert [r.table for r in own.routes] == [100000, 100000]
            assert tplan.differences(p, own) == []
            subprocess.run(["nft", "delete", "table", "inet", "l4gw"], check=True)
            gone = tp.read_own(p)
            assert not gone.table
            assert tplan.differences(p, gone) == ["nftables table inet l4gw is missing"]
        finally:
            tp.teardown()
