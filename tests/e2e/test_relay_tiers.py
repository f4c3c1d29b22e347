"""Relay tiers end to end: a real ``l4gw run`` with ``[plugin.relay]`` set per tier.

Each test checks bytes (SHA-256 both ways, tests/support/backends.py), what the close
hook saw (the core's log line with ``log_connections`` and a test observer that
logs ``flow.tier`` and the ``spliced`` span event), and that the gateway leaves
nothing in the kernel: every BPF program, map, link and BTF object the process
held (read from its /proc/<pid>/fdinfo) is gone after it exits, SIGKILL included,
no ``l4gw*`` pin exists under /sys/fs/bpf, and the sockmap maps are empty once
the flows are done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import proxy_protocol
from gateway.relay import libbpf
from gateway.relay.sockmap import DEFAULT_OBJECT

import gwproc
from backends import (
    AFTER_EOF,
    CONCURRENT,
    FIRST,
    ScriptedBackend,
    check_exchange,
    echo_server,
    recv_all,
    scripted_exchange,
)
from gwproc import GatewayProcess, free_port, l4gw
from relay_helpers import payload

KiB, MiB = 1024, 1024 * 1024
HEADER = 17  # the scripted exchange's header, counted in from_client
HERE = Path(__file__).resolve().parent.parent / "testplugins"
ROOT = HERE.parent.parent
BPFFS = Path("/sys/fs/bpf")

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(60)]

CONN = re.compile(
    r"conn (\d+) \S+ client=\S+ dst=\S+ route=\S+ endpoint=\S+ "
    r"from_client=(\d+) to_client=(\d+) [\d.]+ms (\w+)"
)
TIERLOG = re.compile(
    r"tierlog conn=(\d+) tier=(\w+) from_client=(\d+) to_client=(\d+) spliced=(\S+) "
    r"bytes_before=(\S+) fallbacks=(\d+) reason=(\w+)"
)


def config(port: int, bport: int, relay: str, *, cluster: str = "") -> str:
    return f"""
[gateway]
log_connections = true
drain_timeout = "2s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]
connect_timeout = "2s"
idle_timeout = "30s"
{cluster}

[plugin.relay]
{relay}
"""


@pytest.fixture(scope="module", autouse=True)
def bpf_object() -> None:
    """The sockmap tier's object, built from the current source (scripts/install.sh
    builds it too; a stale one would fail the canary for want of a map)."""
    src = ROOT / "bpf" / "l4gw_sockmap.bpf.c"
    if not DEFAULT_OBJECT.is_file() or DEFAULT_OBJECT.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["make", "-s", "-C", str(ROOT / "bpf")], check=True)


# --- the kernel side: what a gateway process holds -----------------------------------


def bpf_ids(pid: int) -> set[tuple[str, int]]:
    """(kind, id) of every BPF object the process holds an fd of."""
    out: set[tuple[str, int]] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        with contextlib.suppress(OSError):
            for line in entry.read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("prog_id", "map_id", "link_id", "btf_id"):
                    out.add((key.removesuffix("_id"), int(value)))
    return out


def wait_gone(ids: set[tuple[str, int]], timeout: float = 10.0) -> None:
    """Poll until no object of ``ids`` exists (the kernel frees them asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {(kind, i) for kind, i in ids if libbpf.object_exists(kind, i)}
        if not left:
            return
        assert time.monotonic() < deadline, f"BPF objects still exist: {sorted(left)}"
        time.sleep(0.05)


def map_entries(ids: set[tuple[str, int]]) -> dict[str, int]:
    """Entries in each l4gw map among ``ids``, by map name."""
    names = {o.id: o.name for o in libbpf.kernel_objects("map")}
    out: dict[str, int] = {}
    for kind, i in ids:
        if kind != "map" or not names.get(i, "").startswith("l4gw"):
            continue
        if names[i] == "l4gw_events":
            continue  # the events ring: no keys, nothing per flow (sockmap.py R19)
        fd = libbpf.map_fd_by_id(i)
        try:
            n, key = 0, None
            while (key := libbpf.map_get_next_key(fd, key, 8)) is not None:
                n += 1
            out[names[i]] = n
        finally:
            os.close(fd)
    return out


def no_l4gw_pins() -> bool:
    return not BPFFS.is_dir() or not list(BPFFS.glob("l4gw*"))


# --- gateways under test ---------------------------------------------------------------


@dataclass
class RelayGateway:
    proc: GatewayProcess
    status_dir: Path
    ids: set[tuple[str, int]]

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.status_dir / f"{self.pid}.json").read_text())
        return data

    def wait_status(self, check: Callable[[dict[str, Any]], bool], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                if check(self.status()):
                    return
            assert time.monotonic() < deadline, f"status never matched: {self.status()}"
            time.sleep(0.05)

    def wait_maps_empty(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while any(map_entries(self.ids).values()):
            assert time.monotonic() < deadline, map_entries(self.ids)
            time.sleep(0.05)

    def flows(self) -> tuple[list[tuple[int, int]], list[tuple[str, ...]]]:
        """(from_client, to_client) of every logged conn, and every tierlog record."""
        text = self.proc.log
        conns = [(int(m[2]), int(m[3])) for m in CONN.finditer(text)]
        return conns, [m.groups() for m in TIERLOG.finditer(text)]


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """Installs the tierlog observer the way a third-party plugin is installed."""
    dist = tmp_path / "site" / "l4gw_test_tierlog-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: l4gw-test-tierlog\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[l4gw.plugins]\ntierlog = l4gw_test_tierlog\n")
    path = os.pathsep.join([str(tmp_path / "site"), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


@pytest.fixture
def relay_gateway(
    gateway: Callable[..., GatewayProcess], tmp_path: Path, plugin_env: dict[str, str]
) -> Iterator[Callable[..., RelayGateway]]:
    """Factory ``relay_gateway(relay_section, bport, cluster=..., name=...)``; at teardown
    every gateway is stopped and must have left nothing behind."""
    started: list[RelayGateway] = []

    def start(relay: str, bport: int, *, cluster: str = "", name: str = "gw") -> RelayGateway:
        status_dir = tmp_path / "status"
        port = free_port()
        text = config(port, bport, f'{relay}\nstatus_dir = "{status_dir}"', cluster=cluster)
        proc = gateway(text, name=name, env=plugin_env)
        proc.port = port  # type: ignore[attr-defined]
        assert proc.proc is not None
        rg = RelayGateway(proc, status_dir, bpf_ids(proc.proc.pid))
        started.append(rg)
        rg.wait_status(lambda st: st["pid"] == rg.pid)
        return rg

    yield start
    for rg in started:
        status_file = rg.status_dir / f"{rg.pid}.json"
        rg.proc.stop()
        wait_gone(rg.ids)
        assert not status_file.exists(), "status file left after exit"
    assert no_l4gw_pins()


def port_of(rg: RelayGateway) -> int:
    port: int = rg.proc.port  # type: ignore[attr-defined]
    return port


# --- byte-exact per tier ---------------------------------------------------------------

TIERS = {
    "copy": 'tiers = ["copy"]',
    "splice": 'tiers = ["splice"]\npromote_after_bytes = 0',
    "sockmap": 'tiers = ["sockmap", "splice"]\npromote_after_bytes = 0',
    "promoted": 'tiers = ["sockmap", "splice"]\npromote_after_bytes = "1MiB"\npromote_after = "1h"',
}
SEQUENCE = [
    (0, 0, CONCURRENT),
    (1, 1, CONCURRENT),
    (64 * KiB, 64 * KiB, CONCURRENT),
    (64 * MiB, 64 * MiB, CONCURRENT),
    (1 * MiB, 3 * MiB, AFTER_EOF),  # the client half-closes first
    (3 * MiB, 1 * MiB, FIRST),  # the backend half-closes first
]


@pytest.mark.parametrize("tier", list(TIERS))
async def test_tier_byte_exact_and_counted(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway], tier: str
) -> None:
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    rg = relay_gateway(TIERS[tier], bport)
    port = port_of(rg)
    expected: list[tuple[int, int]] = []
    with trio.fail_after(40):
        for seed, (send, reply, mode) in enumerate(SEQUENCE, start=1):
            sent, got = await scripted_exchange("127.0.0.1", port, send, reply, seed, mode)
            await check_exchange(backend, seed, sent, got, reply)
            expected.append((HEADER + send, reply))

        results: dict[int, tuple[int, Any]] = {}

        async def one(seed: int) -> None:
            send, reply = (seed * 7919) % (256 * KiB), (seed * 104729) % (256 * KiB)
            mode = (CONCURRENT, AFTER_EOF, FIRST)[seed % 3]
            results[seed] = (
                reply,
                await scripted_exchange("127.0.0.1", port, send, reply, seed, mode),
            )
            expected.append((HEADER + send, reply))

        async with trio.open_nursery() as n:
            for seed in range(1000, 1200):
                n.start_soon(one, seed)
        for seed, (reply, (sent, got)) in results.items():
            await check_exchange(backend, seed, sent, got, reply)

    total = len(SEQUENCE) + 200
    text = await trio.to_thread.run_sync(rg.proc.wait_log, r"tierlog conn=", 10, total)
    conns, tiers = rg.flows()
    assert text.count("tierlog conn=") == total
    # What the close hook and the access log saw is what was sent, flow by flow.
    assert Counter(conns) == Counter(expected)
    assert Counter((int(t[2]), int(t[3])) for t in tiers) == Counter(expected)
    assert all(t[7] in ("client_eof", "backend_eof") for t in tiers), tiers
    by_size = {(int(t[2]), int(t[3])): t for t in tiers}
    big = by_size[(HEADER + 64 * MiB, 64 * MiB)]
    if tier == "copy":
        assert {t[1] for t in tiers} == {"copy"} and {t[4] for t in tiers} == {"-"}
    elif tier == "splice":
        assert {t[1] for t in tiers} == {"splice"} and {t[4] for t in tiers} == {"splice"}
    elif tier == "sockmap":
        assert big[1] == "sockmap" and big[4] == "sockmap" and big[5] == "0"
        # A flow whose side already sent FIN when it was armed is not ESTABLISHED:
        # sockmap refuses it and splice takes it.
        for t in tiers:
            assert t[1] == "sockmap" or (t[1] == "splice" and t[6] == "1"), t
    else:
        # Promoted for its bytes, so bulk: splice takes it, not sockmap.
        assert big[1] == "splice" == big[4] and MiB <= int(big[5]) < 2 * MiB, big
        small = [t for t in tiers if int(t[2]) + int(t[3]) < MiB]
        assert small and all(t[1] == "copy" and t[4] == "-" for t in small)

    st = rg.status()
    assert st["active"] == (tier != "copy")
    if tier == "sockmap":
        assert st["tiers"]["sockmap"]["enabled"], st
        acc = st["tiers"]["sockmap"]["accelerator"]
        # Through the redirect path, or held by the program and forwarded by the gateway.
        moved = acc["kernel_bytes"] + acc["held_bytes"]
        assert moved >= 2 * 64 * MiB - 2 * MiB and acc["counter_mismatches"] == 0, (
            acc,
            [line for line in rg.proc.log.splitlines() if "sockmap:" in line],
        )
        assert acc["close_reasons"].get("anomaly", 0) == 0
        await trio.to_thread.run_sync(rg.wait_maps_empty)


async def test_long_lived_flow_promoted_by_age_goes_to_sockmap(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway]
) -> None:
    """A request/response flow outlives promote_after: sockmap takes it (the tier that
    wins request/response), with the bytes moved in copy before counted once."""
    eport = await nursery.start(echo_server)
    rg = relay_gateway(
        'tiers = ["sockmap", "splice"]\npromote_after = "300ms"\npromote_after_bytes = "1GiB"',
        eport,
    )
    sent = 0
    with trio.fail_after(20):
        s = await trio.open_tcp_stream("127.0.0.1", port_of(rg))
        async with s:
            start = trio.current_time()
            i = 0
            while trio.current_time() - start < 1.0:
                msg = payload(100 + i, 60 + i)
                await s.send_all(msg)
                got = bytearray()
                while len(got) < len(msg):
                    got += await s.receive_some(1 << 16)
                assert got == msg
                sent += len(msg)
                i += 1
                await trio.sleep(0.02)
            await s.send_eof()
            assert await recv_all(s) == b""
    text = await trio.to_thread.run_sync(rg.proc.wait_log, r"tierlog conn=")
    (record,) = [m.groups() for m in TIERLOG.finditer(text)]
    assert record[1] == "sockmap" == record[4], record
    assert 0 < int(record[5]) < sent  # promoted mid-flow, after some copying
    assert (int(record[2]), int(record[3])) == (sent, sent)
    ((from_client, to_client),) = rg.flows()[0]
    assert (from_client, to_client) == (sent, sent)
    await trio.to_thread.run_sync(rg.wait_maps_empty)


# --- PROXY v2 header, then the kernel tier ---------------------------------------------


@dataclass
class ProxyBackend:
    """Parses the PROXY v2 header, then records the payload's digest and replies."""

    headers: list[proxy_protocol.ProxyHeader]
    payloads: list[bytes]
    reply: bytes

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = bytearray()
            while True:
                parsed = proxy_protocol.parse(buf)
                if isinstance(parsed, proxy_protocol.ProxyHeader):
                    break
                chunk = await stream.receive_some(max(parsed - len(buf), 1))
                assert chunk, "EOF inside the PROXY header"
                buf += chunk
            self.headers.append(parsed)
            rest = bytes(buf[parsed.length :]) + await recv_all(stream)
            self.payloads.append(rest)
            await stream.send_all(self.reply)
            await stream.send_eof()


@pytest.mark.parametrize("tier", ["splice", "sockmap"])
async def test_proxy_v2_header_then_kernel_tier(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway], tier: str
) -> None:
    reply = payload(3 * MiB, 41)
    backend = ProxyBackend([], [], reply)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bport = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, backend.serve, listeners)
    rg = relay_gateway(
        f'tiers = ["{tier}"]\npromote_after_bytes = 0', bport, cluster='proxy_protocol = "v2"'
    )
    body = payload(5 * MiB, 40)
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(rg))
        async with stream:
            client_addr = stream.socket.getsockname()
            got: list[bytes] = []

            async def receive() -> None:
                got.append(await recv_all(stream))

            async with trio.open_nursery() as n:
                n.start_soon(receive)
                await stream.send_all(body)
                await stream.send_eof()
    assert got[0] == reply
    assert backend.payloads == [body]
    header = backend.headers[0]
    assert header.version == 2 and header.command == "PROXY"
    assert header.source == (client_addr[0], client_addr[1])
    assert header.destination == ("127.0.0.1", port_of(rg))
    text = await trio.to_thread.run_sync(rg.proc.wait_log, r"tierlog conn=")
    (record,) = [m.groups() for m in TIERLOG.finditer(text)]
    # The header went to the backend, but from_client counts only the client's bytes.
    assert (record[1], record[4], int(record[2]), int(record[3])) == (
        tier, tier, len(body), len(reply)
    )  # fmt: skip


# --- tiers that cannot load: one line, and the flows go on -----------------------------


async def test_missing_object_one_line_then_splice(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway], tmp_path: Path
) -> None:
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    missing = tmp_path / "absent.bpf.o"
    rg = relay_gateway(
        f'tiers = ["sockmap", "splice"]\npromote_after_bytes = 0\nsockmap_object = "{missing}"',
        bport,
    )
    lines = [line for line in rg.proc.log.splitlines() if "sockmap" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "sockmap tier disabled" in lines[0]
    assert str(missing) in lines[0] and "missing" in lines[0] and "use splice" in lines[0]
    assert rg.ids == set(), "nothing of BPF may be loaded when the object is missing"
    with trio.fail_after(20):
        sent, got = await scripted_exchange("127.0.0.1", port_of(rg), 8 * MiB, 8 * MiB, 5)
        await check_exchange(backend, 5, sent, got, 8 * MiB)
    text = await trio.to_thread.run_sync(rg.proc.wait_log, r"tierlog conn=")
    assert " tier=splice " in text
    await trio.to_thread.run_sync(
        rg.wait_status, lambda st: st["tiers"]["splice"]["flows_total"] == 1
    )
    st = rg.status()["tiers"]
    assert not st["sockmap"]["enabled"] and "missing" in st["sockmap"]["why_not"]
    assert st["splice"]["enabled"]


@pytest.mark.parametrize("explicit", [True, False], ids=["tiers_set", "default_tiers"])
async def test_no_bpf_capability_falls_back(
    nursery: trio.Nursery,
    gateway: Callable[..., GatewayProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    plugin_env: dict[str, str],
    explicit: bool,
) -> None:
    """T22: without CAP_BPF/CAP_SYS_ADMIN the load is refused and the gateway says so in
    one line: a warning when the config asks for sockmap, info when only the default
    list tries it; flows use splice."""
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    relay = f'promote_after_bytes = 0\nstatus_dir = "{tmp_path}/st"'
    if explicit:
        relay = f'tiers = ["sockmap", "splice"]\n{relay}'
    setpriv = ["setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon"]
    monkeypatch.setattr(gwproc, "L4GW", [*setpriv, *gwproc.L4GW])
    gw = gateway(config(port, bport, relay), name="nocap", env=plugin_env)
    lines = [line for line in gw.log.splitlines() if "sockmap" in line]
    assert len(lines) == 1 and "not permitted" in lines[0] and "use splice" in lines[0], lines
    assert (" WARNING " if explicit else " INFO ") in lines[0]
    with trio.fail_after(20):
        sent, got = await scripted_exchange("127.0.0.1", port, 2 * MiB, 2 * MiB, 6)
        await check_exchange(backend, 6, sent, got, 2 * MiB)
    text = await trio.to_thread.run_sync(gw.wait_log, r"tierlog conn=\d+ tier=splice ")
    assert "tier=splice" in text


# --- kill -9 with armed flows, then restart (T19) --------------------------------------


def dmesg_problems() -> list[str] | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line for line in out.splitlines() if re.search(r"WARNING:|BUG:|Call Trace", line)]


async def test_kill9_with_armed_flows_then_restart(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway]
) -> None:
    eport = await nursery.start(echo_server)
    relay = 'tiers = ["sockmap"]\npromote_after_bytes = 0'
    rg = relay_gateway(relay, eport, name="first")
    problems_before = dmesg_problems()
    streams = []
    chunk = payload(64 * KiB, 50)
    with trio.fail_after(20):
        for _ in range(6):
            s = await trio.open_tcp_stream("127.0.0.1", port_of(rg))
            streams.append(s)
            await s.send_all(chunk)
            got = bytearray()
            while len(got) < len(chunk):
                got += await s.receive_some(1 << 20)
            assert got == chunk
    # Every flow is in the kernel: both sockets of each in the verdict sockhash.
    await trio.to_thread.run_sync(
        rg.wait_status, lambda st: st["tiers"]["sockmap"]["flows_now"] == 6
    )
    assert map_entries(rg.ids)["l4gw_active"] == 12
    status_file = rg.status_dir / f"{rg.pid}.json"
    assert rg.proc.proc is not None
    rg.proc.proc.send_signal(signal.SIGKILL)
    rg.proc.proc.wait(10)

    # Clients see their flows end (FIN or RST), not a hang.
    with trio.fail_after(10):
        for s in streams:
            try:
                assert await recv_all(s) == b""
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, OSError)
                assert exc.__cause__.errno in (errno.ECONNRESET, errno.EPIPE)
            await s.aclose()
    # The kernel freed everything the process held: nothing was pinned.
    await trio.to_thread.run_sync(wait_gone, rg.ids)
    assert no_l4gw_pins()
    assert status_file.exists(), "kill -9 cannot remove the status file..."

    again = relay_gateway(relay, eport, name="second")
    assert not status_file.exists(), "...so the next start removes it"
    assert f"removed {status_file}" in again.proc.log
    assert again.ids and not (again.ids & rg.ids)
    with trio.fail_after(10):
        s = await trio.open_tcp_stream("127.0.0.1", port_of(again))
        async with s:
            await s.send_all(chunk)
            await s.send_eof()
            assert await recv_all(s) == chunk
    await trio.to_thread.run_sync(again.wait_maps_empty)
    problems_after = dmesg_problems()
    if problems_before is not None and problems_after is not None:
        assert problems_after == problems_before, problems_after[len(problems_before) :]


# --- l4gw accel status -------------------------------------------------------------------


async def test_accel_status_cli(
    nursery: trio.Nursery, relay_gateway: Callable[..., RelayGateway], tmp_path: Path
) -> None:
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    rg = relay_gateway('tiers = ["sockmap", "splice"]\npromote_after_bytes = 0', bport)
    with trio.fail_after(20):
        sent, got = await scripted_exchange("127.0.0.1", port_of(rg), 4 * MiB, 4 * MiB, 9)
        await check_exchange(backend, 9, sent, got, 4 * MiB)
    await trio.to_thread.run_sync(
        rg.wait_status, lambda st: st["tiers"]["sockmap"]["flows_total"] == 1
    )
    done = await trio.to_thread.run_sync(
        lambda: l4gw("accel", "status", "-c", str(rg.proc.config_path), "--json")
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["probe"]["sockmap"]["usable"] and doc["probe"]["splice"]["usable"]
    (running,) = [g for g in doc["gateways"] if g["pid"] == rg.pid]
    assert running["tiers"]["sockmap"]["flows_total"] == 1
    acc = running["tiers"]["sockmap"]["accelerator"]
    assert acc["kernel_bytes"] + acc["held_bytes"] >= 8 * MiB
    assert {o["name"] for o in doc["kernel_objects"] if o["pid"] == rg.pid} >= {
        "l4gw_verdict", "l4gw_active", "l4gw_targets"
    }  # fmt: skip

    human = await trio.to_thread.run_sync(
        lambda: l4gw("accel", "status", "-c", str(rg.proc.config_path))
    )
    assert human.returncode == 0, human.stderr
    assert re.search(r"sockmap\s+usable", human.stdout), human.stdout
    assert f"pid {rg.pid}" in human.stdout

    broken = tmp_path / "broken.toml"
    broken.write_text(
        rg.proc.config_path.read_text().replace(
            'tiers = ["sockmap", "splice"]',
            f'tiers = ["sockmap", "splice"]\nsockmap_object = "{tmp_path}/nope.o"',
        )
    )
    bad = await trio.to_thread.run_sync(lambda: l4gw("accel", "status", "-c", str(broken)))
    assert bad.returncode == 1, bad.stdout
    assert "nope.o" in bad.stdout and "missing" in bad.stdout
