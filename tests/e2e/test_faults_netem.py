"""Faults on the wire and at the backend, with the gateway in its own namespace.

A real ``l4gw run`` serves in the gateway namespace of the three-namespace
topology (tests/support/netns.py) on plain listeners (no TPROXY): ``public`` and
``public6`` on the client-side veth go to the ``api`` cluster, a scripted
backend in the backend namespace; ``fault`` goes to whatever endpoints a test
puts in harm's way. Every case runs in each relay tier it can reach (``copy``,
``splice``, ``sockmap``, promoted at once), because each tier has its own idle
timer, reset handling and backpressure.

The faults:

* loss, delay with jitter and reordering on every veth end (netns
  ``Topology.impaired``: this kernel has no sch_netem, so nftables and HTB
  classes stand in for it), while many connections move small and multi-MiB
  sequence-numbered payloads both ways, half-closes included;
* a retransmission that overlaps bytes the gateway already has (crafted with a
  raw socket, as a sender that re-cuts its segments sends one): each byte
  reaches the backend once;
* the backend link down for less than TCP's retries (the transfer completes
  intact) or for longer than the idle timeout (the client sees the close at
  once, the log says ``idle_timeout``);
* the backend process SIGKILLed mid-stream (its kernel resets the connection:
  the client must see a reset, not a clean end, and the log says
  ``backend_reset``);
* a backend that accepts and never reads (the client is held back through TCP:
  what it can push and the gateway's RSS stay bounded; the idle timeout cuts
  the pair, and the backend learns of the cut by a reset, not by a FIN after
  a truncated stream);
* endpoints that never accept (accept queue full, SYNs dropped): the connect
  timeout moves on to the next endpoint, or the client is closed with
  ``connect_failed``.

After every case :meth:`Rig.settle` checks that nothing leaked: the gateway's
file descriptors are back to their count before the case (the splice tier's
free pipes aside: its reserve, which the status reports), ``/connections`` is
empty, ``l4gw_connection_active`` is 0, no relay tier holds a flow, and a fresh
connection is still served byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from backends import (
    AFTER_EOF,
    CONCURRENT,
    FIRST,
    HEADER,
    ScriptedBackend,
    check_exchange,
    digest,
    exchange_on,
)
from gwproc import GatewayProcess
from netns import (
    BACKEND4,
    GW_CLIENT_SIDE4,
    GW_CLIENT_SIDE6,
    Topology,
    inside,
    tcp_connect,
    tcp_listen,
)
from netns import topology as topology  # the fixture
from relay_helpers import PAYLOAD_BLOCK, PayloadCheck, first_mismatch, payload, payload_block

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(180)]

KiB, MiB = 1 << 10, 1 << 20
TIERS = ("copy", "splice", "sockmap")
PORT, FAULT_PORT, ADMIN = 8000, 8100, 9901
BPORT = 9000  # the scripted backend
RELAY = {
    "copy": 'tiers = ["copy"]',
    "splice": 'tiers = ["splice", "copy"]\npromote_after_bytes = 0',
    "sockmap": 'tiers = ["sockmap", "copy"]\npromote_after_bytes = 0',
}
# Through 5 % loss per hop a SYN is lost now and then: its retry comes after 1 s, 3 s.
CONNECT_WAIT = 20.0


def config(tier: str, fault_endpoints: list[str], fault_cluster: str) -> str:
    eps = ", ".join(f'"{e}"' for e in fault_endpoints)
    return f"""
[gateway]
log_connections = true
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "{GW_CLIENT_SIDE4}:{PORT}"

[[listener]]
name = "public6"
bind = "[{GW_CLIENT_SIDE6}]:{PORT}"

[[listener]]
name = "fault"
bind = "{GW_CLIENT_SIDE4}:{FAULT_PORT}"

[[route]]
listener = "public"
cluster = "api"

[[route]]
listener = "public6"
cluster = "api"

[[route]]
listener = "fault"
cluster = "fault"

[cluster.api]
endpoints = ["{BACKEND4}:{BPORT}"]
connect_timeout = "10s"

[cluster.fault]
endpoints = [{eps}]
{fault_cluster}

[admin]
bind = "127.0.0.1:{ADMIN}"

[plugin.relay]
{RELAY[tier]}
status_dir = ""
"""


# --- the rig: gateway, backend, and the leak check ----------------------------------------------


def _http_get(ns: str, port: int, path: str) -> tuple[int, bytes]:
    with inside(ns):
        sock = socket.socket()
    with sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@dataclass
class Rig:
    topo: Topology
    gw: GatewayProcess
    tier: str
    backend: ScriptedBackend
    baseline_fds: int = 0
    seeds: list[int] = field(default_factory=lambda: [1000])

    @property
    def pid(self) -> int:
        assert self.gw.proc is not None
        return self.gw.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert m
        return int(m[1]) * KiB

    def seed(self) -> int:
        self.seeds[0] += 1
        return self.seeds[0]

    async def admin(self, path: str) -> bytes:
        status, body = await trio.to_thread.run_sync(_http_get, self.topo.gateway, ADMIN, path)
        assert status == 200, (path, status, body)
        return body

    async def connect(self, port: int = PORT, six: bool = False) -> trio.SocketStream:
        host = GW_CLIENT_SIDE6 if six else GW_CLIENT_SIDE4
        return await tcp_connect(self.topo.client, host, port, timeout=CONNECT_WAIT)

    async def exchange(
        self, send: int, reply: int, mode: int = CONCURRENT, six: bool = False
    ) -> None:
        """One scripted exchange through ``api``, checked byte for byte both ways."""
        seed = self.seed()
        stream = await self.connect(six=six)
        sent, got = await exchange_on(stream, send, reply, seed, mode)
        await check_exchange(self.backend, seed, sent, got, reply)

    def reason(self, client_port: int, timeout: float = 15) -> str:
        """The close reason the gateway logged for the connection from ``client_port``."""
        pattern = rf"conn \d+ \S+ client=\S+:{client_port} .* \d+\.\dms (\w+)"
        text = self.gw.wait_log(pattern, timeout)
        return re.findall(pattern, text)[-1]

    async def open_flows(self) -> dict[str, Any]:
        """What the gateway says it holds: /connections, the active gauge, tier flows."""
        connections = json.loads(await self.admin("/connections"))["count"]
        families = {
            f.name: f
            for f in text_string_to_metric_families((await self.admin("/metrics")).decode())
        }
        active = sum(s.value for s in families["l4gw_connection_active"].samples)
        relay = json.loads(await self.admin("/status"))["relay"]
        tiers = {name: t["flows_now"] for name, t in relay["tiers"].items()}
        acc = relay["tiers"]["sockmap"].get("accelerator") or {}
        pipes = relay["tiers"]["splice"].get("pipes") or {}
        return {
            "connections": connections,
            "active": active,
            "tiers": tiers,
            "accelerator_flows": acc.get("flows_now", 0),
            "pipes_lent": pipes.get("lent", 0),
            "counter_mismatches": acc.get("counter_mismatches", 0),
            # The splice tier's free pipes are its reserve, not a leak (the status
            # reports them; gateway/relay/pipes.py); a pipe still lent would be one.
            "fds": self.fds() - 2 * pipes.get("free", 0),
        }

    async def quiet(self, timeout: float = 30) -> dict[str, Any]:
        """Wait until the gateway holds no flow and no more fds than at the baseline."""
        want = {"connections": 0, "active": 0, "accelerator_flows": 0, "pipes_lent": 0}
        with trio.move_on_after(timeout):
            while True:
                state = await self.open_flows()
                if (
                    all(state[k] == v for k, v in want.items())
                    and not any(state["tiers"].values())
                    and (not self.baseline_fds or state["fds"] <= self.baseline_fds)
                ):
                    return state
                await trio.sleep(0.1)
        raise AssertionError(f"gateway did not settle: {state} (baseline fds {self.baseline_fds})")

    async def start(self) -> None:
        await self.exchange(64 * KiB, 64 * KiB)
        self.baseline_fds = (await self.quiet())["fds"]

    async def settle(self) -> None:
        """The leak check after a case, then a fresh connection byte for byte."""
        state = await self.quiet()
        assert state["fds"] == self.baseline_fds, state
        assert state["counter_mismatches"] == 0, state
        await self.exchange(100 * KiB, 300 * KiB, AFTER_EOF)
        await self.exchange(0, 1, FIRST, six=True)
        assert (await self.quiet())["fds"] == self.baseline_fds


StartRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def start_rig(
    topology: Topology, gateway: Callable[..., GatewayProcess], nursery: trio.Nursery
) -> AsyncIterator[StartRig]:
    """``await start_rig(tier, fault_endpoints=[...], fault_cluster="...")``: the scripted
    backend in the backend namespace, the gateway in the gateway namespace, warmed up
    and its baseline taken."""

    async def start(tier: str, fault_endpoints: list[str] | None = None,
                    fault_cluster: str = "") -> Rig:  # fmt: skip
        backend = ScriptedBackend()
        listener = tcp_listen(topology.backend, BACKEND4, BPORT)
        nursery.start_soon(trio.serve_listeners, backend.serve, [listener])
        text = config(tier, fault_endpoints or [f"{BACKEND4}:{BPORT}"], fault_cluster)
        gw = gateway(text, netns=topology.gateway)
        if tier != "copy":
            # A tier that failed its self-test would leave every flow in copy: then this
            # test would not test what it says.
            _, body = await trio.to_thread.run_sync(_http_get, topology.gateway, ADMIN, "/status")
            state = json.loads(body)["relay"]["tiers"][tier]
            assert state["enabled"], state
        rig = Rig(topology, gw, tier, backend)
        await rig.start()
        return rig

    yield start


async def tier_used(rig: Rig) -> None:
    """The tier under test carried flows (not a silent fallback to copy)."""
    relay = json.loads(await rig.admin("/status"))["relay"]
    if rig.tier == "copy":
        assert relay["active"] is False, relay  # the plugin is off: the core copies
    else:
        assert relay["tiers"][rig.tier]["flows_total"] > 0, relay


def tcp_ext(topo: Topology, ns: str, name: str) -> int:
    """A TcpExt counter of namespace ``ns`` (/proc/net/netstat)."""
    lines = topo.exec(ns, "cat", "/proc/net/netstat", check=True).stdout.splitlines()
    for keys, values in zip(lines[::2], lines[1::2], strict=True):
        if keys.startswith("TcpExt:"):
            return int(dict(zip(keys.split(), values.split(), strict=True))[name])
    raise KeyError(name)


# --- a paced client, so that a fault lands mid-stream -------------------------------------------


class Transfer:
    """One client connection of the scripted exchange (CONCURRENT): ``up`` bytes of the
    payload of ``seed`` out, ``down`` bytes of ``seed + 1`` back, checked as they arrive.
    Each 64 KiB out and each read in waits ``pace`` seconds, so it lasts a while."""

    def __init__(self, stream: trio.SocketStream, up: int, down: int, seed: int,
                 pace: float) -> None:  # fmt: skip
        self.stream, self.up, self.down, self.seed, self.pace = stream, up, down, seed, pace
        self.port: int = stream.socket.getsockname()[1]
        self.sent = 0
        self.check = PayloadCheck(seed + 1)
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    async def run(self) -> None:
        try:
            async with self.stream:
                await self.stream.send_all(HEADER.pack(self.down, self.seed, CONCURRENT))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._receive)
                    await self._send()
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            self.error = group.exceptions[0]
        finally:
            self.ended_at = trio.current_time()

    async def _send(self) -> None:
        chunk = 64 * KiB
        while self.sent < self.up:
            index, skip = divmod(self.sent, PAYLOAD_BLOCK)
            n = min(chunk, self.up - self.sent, PAYLOAD_BLOCK - skip)
            await self.stream.send_all(payload_block(self.seed, index)[skip : skip + n])
            self.sent += n
            await trio.sleep(self.pace)
        await self.stream.send_eof()

    async def _receive(self) -> None:
        while data := await self.stream.receive_some(64 * KiB):
            self.check.feed(data)
            await trio.sleep(self.pace)

    async def moved(self, n: int) -> None:
        """Wait until ``n`` bytes went each way."""
        while self.sent < n or self.check.received < n:
            assert self.ended_at is None, f"ended early: {self.error!r}"
            await trio.sleep(0.02)


# --- impaired links -------------------------------------------------------------------------------

# (send, reply, mode, IPv6) for the connections that run at once: small ones in every
# half-close mode, and a few of several MiB.
MIXED = [
    (send, reply, mode, i % 2 == 1)
    for i, (send, reply, mode) in enumerate(
        [
            (0, 1, FIRST),
            (1, 0, AFTER_EOF),
            (100, 1460, CONCURRENT),
            (1460, 100, FIRST),
            (4096, 65536, AFTER_EOF),
            (65536, 4096, CONCURRENT),
            (200_000, 3, FIRST),
            (3, 200_000, AFTER_EOF),
        ]
        * 3
        + [
            (6 * MiB, 6 * MiB, CONCURRENT),
            (4 * MiB, 3 * MiB, AFTER_EOF),
            (3 * MiB, 5 * MiB, FIRST),
            (0, 6 * MiB, AFTER_EOF),
        ]
    )
]


@pytest.mark.parametrize("tier", TIERS)
async def test_loss_delay_and_reordering_keep_every_byte(start_rig: StartRig, tier: str) -> None:
    rig = await start_rig(tier)
    ofo_before = tcp_ext(rig.topo, rig.topo.gateway, "TCPOFOQueue")
    with rig.topo.impaired(loss_percent=5) as impairment:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for send, reply, mode, six in MIXED:
                    nursery.start_soon(rig.exchange, send, reply, mode, six)
        dropped, delayed = impairment.dropped(), impairment.delayed()
    # The faults happened: packets were dropped, delayed, and the gateway's TCP had to
    # queue segments that arrived out of order (after a loss or a reordering).
    assert dropped > 50, dropped
    assert delayed > 500, delayed
    assert tcp_ext(rig.topo, rig.topo.gateway, "TCPOFOQueue") > ofo_before
    await tier_used(rig)
    await rig.settle()


# Reading a socket's sequence numbers (linux/tcp.h): TCP_REPAIR = 19,
# TCP_REPAIR_QUEUE = 20, TCP_QUEUE_SEQ = 21; queues TCP_RECV_QUEUE = 1,
# TCP_SEND_QUEUE = 2; TCP_REPAIR_OFF_NO_WP = -1 leaves repair mode without a probe.
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE, TCP_SEND_QUEUE, TCP_REPAIR_OFF_NO_WP = 1, 2, -1


def sequence_numbers(sock: socket.socket) -> tuple[int, int]:
    """(next sequence number to send, next expected) of a connected TCP socket."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        snd = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv = sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return snd, rcv


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_segment(src: tuple[str, int], dst: tuple[str, int], seq: int, ack: int,
                data: bytes) -> bytes:  # fmt: skip
    """An IPv4 packet holding one TCP segment (ACK|PSH, no options) with ``data``."""
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, ack, 5 << 4, 0x18, 65535, 0, 0)
    pseudo = socket.inet_aton(src[0]) + socket.inet_aton(dst[0])
    pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp) + len(data))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp + data)) + tcp[18:] + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP,
                     0, socket.inet_aton(src[0]), socket.inet_aton(dst[0]))  # fmt: skip
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + tcp


@dataclass
class Recorder:
    """A backend that keeps every byte of each connection, until its EOF."""

    streams: list[bytearray] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    async def serve(self, stream: trio.SocketStream) -> None:
        got = bytearray()
        self.streams.append(got)
        async with stream:
            while data := await stream.receive_some(1 << 16):
                got += data
        self.done.set()


@pytest.mark.parametrize("tier", TIERS)
async def test_retransmission_overlapping_delivered_bytes_is_not_duplicated(
    start_rig: StartRig, tier: str, topology: Topology, nursery: trio.Nursery
) -> None:
    """A segment that repeats 500 bytes the gateway has and brings 300 new ones, as a
    sender that re-cuts its segments after a loss sends: the backend gets each byte
    once. (The sockmap program is handed such a segment whole by the kernel.)"""
    rport, first, back, new = 9500, 10_000, 500, 300
    # No TCP timestamps from the client, so a crafted segment needs no options.
    topology.sysctl(topology.client, "net.ipv4.tcp_timestamps", "0")
    recorder = Recorder()
    rig = await start_rig(tier, [f"{BACKEND4}:{rport}"], 'idle_timeout = "30s"')
    nursery.start_soon(
        trio.serve_listeners, recorder.serve, [tcp_listen(topology.backend, BACKEND4, rport)]
    )
    data = payload(2 * first, rig.seed())
    with inside(topology.client):
        plain = socket.socket()
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with raw, trio.fail_after(20):
        client = trio.socket.from_stdlib_socket(plain)
        await client.connect((GW_CLIENT_SIDE4, FAULT_PORT))
        local = client.getsockname()
        await client.send(data[:first])
        while not recorder.streams or len(recorder.streams[0]) < first:
            await trio.sleep(0.01)
        await trio.sleep(0.2)  # every ACK is in: the gateway's next expected byte is `first`
        snd, rcv = sequence_numbers(plain)
        segment = data[first - back : first + new]
        packet = tcp_segment(local, (GW_CLIENT_SIDE4, FAULT_PORT), (snd - back) & 0xFFFFFFFF, rcv,
                             segment)  # fmt: skip
        raw.sendto(packet, (GW_CLIENT_SIDE4, 0))
        await trio.sleep(0.2)
        # The client's own TCP sends the 300 new bytes again, within its next segment:
        # another overlap, with what the crafted one brought.
        sent = first
        while sent < len(data):
            sent += await client.send(data[sent:])
        client.shutdown(socket.SHUT_WR)
        await recorder.done.wait()
        client.close()
    assert first_mismatch(bytes(recorder.streams[0]), data) == "equal"
    if tier == "sockmap":
        acc = json.loads(await rig.admin("/status"))["relay"]["tiers"]["sockmap"]["accelerator"]
        assert acc["trimmed_bytes"] >= back + new, acc
    await tier_used(rig)
    await rig.settle()


# --- link outages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
async def test_short_outage_mid_transfer_completes_intact(start_rig: StartRig, tier: str) -> None:
    # Bigger than every buffer on the way (socket buffers, relay buffer, pipe), so the
    # outage stalls both directions instead of being absorbed by them.
    size, outage = 24 * MiB, 1.5
    rig = await start_rig(tier, fault_cluster='idle_timeout = "30s"')
    seed = rig.seed()
    transfer = Transfer(await rig.connect(FAULT_PORT), size, size, seed, pace=0.005)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer.run)
                await transfer.moved(512 * KiB)
                # Shorter than TCP's retries (RTO backoff 0.2, 0.4, 0.8, 1.6 s, ...).
                rig.topo.set_link("gw-be", False)
                cut = trio.current_time()
                await trio.sleep(outage)
                stalled = (transfer.sent, transfer.check.received)
                rig.topo.set_link("gw-be", True)
    finally:
        rig.topo.set_link("gw-be", True)
    assert transfer.error is None, transfer.error
    assert stalled[0] < size and stalled[1] < size, stalled
    assert transfer.ended_at is not None and transfer.ended_at - cut > outage
    assert transfer.check.verdict(size) == "equal"
    with trio.fail_after(20):
        while seed not in rig.backend.received:
            await trio.sleep(0.02)
    assert rig.backend.received[seed] == digest(payload(size, seed))
    assert rig.reason(transfer.port) in ("client_eof", "backend_eof")
    await tier_used(rig)
    await rig.settle()


@pytest.mark.parametrize("tier", TIERS)
async def test_long_outage_closes_the_client_promptly(start_rig: StartRig, tier: str) -> None:
    idle = 2.0
    rig = await start_rig(tier, fault_cluster=f'idle_timeout = "{idle}s"')
    transfer = Transfer(await rig.connect(FAULT_PORT), 64 * MiB, 64 * MiB, rig.seed(), pace=0.01)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(transfer.run)
                await transfer.moved(512 * KiB)
                rig.topo.set_link("gw-be", False)
                cut = trio.current_time()
                while transfer.ended_at is None:
                    await trio.sleep(0.02)
        waited = transfer.ended_at - cut
    finally:
        rig.topo.set_link("gw-be", True)
    # Nothing moved for the idle timeout, and the client heard of it at once (a
    # bound well under TCP's own give-up time of minutes).
    assert idle * 0.9 <= waited <= idle + 5, waited
    assert transfer.check.received < 64 * MiB
    assert rig.reason(transfer.port) == "idle_timeout"
    await rig.settle()


# --- the backend dies, hangs, or never answers ------------------------------------------------------

KILLABLE = """
import os, socket, sys, threading
host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((host, port))
ls.listen()
open(ready, "w").close()
block = bytes(range(256)) * 256

def serve(conn):
    # Never reads: what the client sends stays unread, so when this process is
    # killed its kernel resets the connection rather than closing it with a FIN.
    try:
        while True:
            conn.sendall(block)
    except OSError:
        pass

while True:
    conn, _ = ls.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.mark.parametrize("tier", TIERS)
async def test_backend_killed_mid_stream(start_rig: StartRig, tier: str, tmp_path: Path) -> None:
    kport = 9100
    rig = await start_rig(
        tier, [f"{BACKEND4}:{kport}"], 'idle_timeout = "30s"\nconnect_timeout = "2s"'
    )
    ready = tmp_path / "killable.ready"
    proc = rig.topo.popen(rig.topo.backend, sys.executable, "-c", KILLABLE, BACKEND4,
                          str(kport), str(ready))  # fmt: skip
    with trio.fail_after(10):
        while not ready.exists():
            await trio.sleep(0.02)
    stream = await rig.connect(FAULT_PORT)
    port = stream.socket.getsockname()[1]
    got = 0
    with trio.fail_after(20):
        await stream.send_all(b"u" * 64 * KiB)
        while got < 1 * MiB:
            got += len(await stream.receive_some(1 << 16))
        proc.send_signal(signal.SIGKILL)
        killed = trio.current_time()
        # The client must learn of it as a reset: a clean EOF would pass the cut
        # stream off as complete.
        with pytest.raises(trio.BrokenResourceError):
            while True:
                if not await stream.receive_some(1 << 16):
                    raise AssertionError("clean EOF after the backend was killed")
        waited = trio.current_time() - killed
    await stream.aclose()
    assert waited < 5, waited
    assert rig.reason(port) == "backend_reset"
    proc.wait(10)
    await tier_used(rig)
    await rig.settle()


@dataclass
class Holder:
    """A backend that accepts and never reads; the streams stay open for the test."""

    streams: list[trio.SocketStream] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        self.streams.append(stream)
        await trio.sleep_forever()


@pytest.mark.parametrize("tier", TIERS)
async def test_backend_that_never_reads_holds_the_client_back(
    start_rig: StartRig, tier: str, nursery: trio.Nursery
) -> None:
    hport, idle, push = 9200, 2.0, 256 * MiB
    holder = Holder()
    rig = await start_rig(tier, [f"{BACKEND4}:{hport}"], f'idle_timeout = "{idle}s"')
    nursery.start_soon(
        trio.serve_listeners, holder.serve, [tcp_listen(rig.topo.backend, BACKEND4, hport)]
    )
    seed = rig.seed()
    rss_before = peak = rig.rss()
    stream = await rig.connect(FAULT_PORT)
    port = stream.socket.getsockname()[1]
    sock = stream.socket
    sent = 0
    cut: BaseException | None = None

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rig.rss())
            await trio.sleep(0.02)

    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            inner.start_soon(watch_rss)
            try:
                while sent < push:
                    index, skip = divmod(sent, PAYLOAD_BLOCK)
                    sent += await sock.send(payload_block(seed, index)[skip:])
            except OSError as exc:
                cut = exc
            inner.cancel_scope.cancel()
    # Held back: the client could hand the kernel only what the buffers on the way
    # hold (socket buffers, one relay buffer or pipe, sockmap's watermark), and the
    # gateway did not buffer the rest in its memory.
    assert cut is not None, f"pushed all {sent} bytes into a backend that never reads"
    assert sent < 64 * MiB, sent
    assert peak - rss_before < 64 * MiB, (peak, rss_before)
    assert rig.reason(port) == "idle_timeout"
    await stream.aclose()

    # The backend reads now: a prefix of what the client sent, then a reset. A FIN
    # here would tell it that the client's stream ended where the gateway cut it.
    assert len(holder.streams) == 1
    backend = holder.streams[0]
    check = PayloadCheck(seed)
    with trio.fail_after(30), pytest.raises(trio.BrokenResourceError):
        while data := await backend.receive_some(1 << 20):
            check.feed(data)
        raise AssertionError(f"clean EOF after {check.received} of {sent} bytes")
    assert check.mismatch is None
    await backend.aclose()
    await rig.settle()


@pytest.fixture
def never_accepting(topology: Topology) -> Any:
    """Two endpoints in the backend namespace that never answer a SYN: one listener
    with a full accept queue (Linux drops a SYN then: tcp_conn_request,
    sk_acceptq_is_full), one port whose SYNs nftables drops."""
    full_port, dropped_port = 9300, 9400
    with inside(topology.backend):
        listener = socket.socket()
    listener.bind((BACKEND4, full_port))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        with inside(topology.backend):
            s = socket.socket()
        s.setblocking(False)
        s.connect_ex((BACKEND4, full_port))
        fillers.append(s)
    table = f"l4gw_syndrop_{os.getpid()}"
    rules = f"""
table inet {table} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {dropped_port} tcp flags & (syn | ack) == syn drop
    }}
}}
"""
    subprocess.run(["ip", "netns", "exec", topology.backend, "nft", "-f", "-"], input=rules,
                   text=True, check=True, timeout=10)  # fmt: skip
    try:
        time.sleep(0.2)
        for port in (full_port, dropped_port):
            with inside(topology.backend):
                probe = socket.socket()
            probe.settimeout(0.3)
            with pytest.raises(TimeoutError):
                probe.connect((BACKEND4, port))
            probe.close()
        yield [f"{BACKEND4}:{full_port}", f"{BACKEND4}:{dropped_port}"]
    finally:
        subprocess.run(["ip", "netns", "exec", topology.backend, "nft", "delete", "table",
                        "inet", table], capture_output=True, timeout=10)  # fmt: skip
        for s in fillers:
            s.close()
        listener.close()


async def test_endpoints_that_never_accept_time_out_to_the_next(
    start_rig: StartRig, never_accepting: list[str]
) -> None:
    rig = await start_rig(
        "copy",
        [*never_accepting, f"{BACKEND4}:{BPORT}"],
        'connect_timeout = "1s"\nconnect_attempts = 3',
    )
    waits = []
    for _ in range(3):
        seed = rig.seed()
        start = trio.current_time()
        with trio.fail_after(15):
            stream = await rig.connect(FAULT_PORT)
            sent, got = await exchange_on(stream, 5000, 7000, seed, AFTER_EOF)
            await check_exchange(rig.backend, seed, sent, got, 7000)
        waits.append(trio.current_time() - start)
    # Round robin starts each connection at the next endpoint: one went through both
    # silent ones (two connect timeouts), one through one of them.
    assert max(waits) >= 1.8, waits
    assert "connect_failed" not in rig.gw.log
    await rig.settle()


async def test_only_endpoints_that_never_accept_close_promptly(
    start_rig: StartRig, never_accepting: list[str]
) -> None:
    rig = await start_rig("copy", never_accepting, 'connect_timeout = "1s"\nconnect_attempts = 2')
    with trio.fail_after(15):
        stream = await rig.connect(FAULT_PORT)
        port = stream.socket.getsockname()[1]
        start = trio.current_time()
        async with stream:
            await stream.send_all(b"hello")
            try:
                assert await stream.receive_some(1 << 16) == b""
            except trio.BrokenResourceError:
                pass  # unread bytes make the close a reset; either way it is prompt
        waited = trio.current_time() - start
    assert 1.8 <= waited <= 5, waited
    assert rig.reason(port) == "connect_failed"
    line = [ln for ln in rig.gw.log.splitlines() if f":{port} " in ln][-1]
    assert line.count("timed out after 1s") == 2, line
    await rig.settle()
