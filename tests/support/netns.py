"""Network namespaces for end-to-end tests: the three-namespace topology and small helpers.

The topology (:class:`Topology`, fixture ``topology``)::

    client ns                      gateway ns (the router, TPROXY)                backend ns
    cli0 198.18.0.2/24  ───────  gw-cli 198.18.0.1/24      gw-be 198.18.1.1/24  ───────  be0 198.18.1.2/24
         fd00::2/64                     fd00::1/64                fd00:1::1/64                fd00:1::2/64
    default via the gateway                                        default via the gateway

* Service addresses, 198.18.2.0/24 and fd00:2::/64, exist nowhere: the client's
  default route sends them to the gateway, which intercepts them (TPROXY).
* "Elsewhere" addresses, 198.18.3.10 and fd00:3::10, are real: they live on the
  backend's loopback and the gateway routes 198.18.3.0/24 and fd00:3::/64 to the
  backend, so a packet the gateway forwarded instead of intercepting would
  reach them.
* The gateway forwards (ip_forward = 1, IPv6 forwarding = 1) like a router.

Names are unique per run and per topology (``l4gw-<pid>-<n>-cli``); namespaces
left behind by a killed run (their pid is gone) are removed when the next one
starts. Deleting a namespace deletes its veth ends; processes started through
:meth:`Topology.popen` are killed first.

Helpers that other tests reuse: :meth:`Topology.exec` and :meth:`Topology.popen`
(``ip netns exec``), :func:`inside` (this thread enters a namespace for the
duration of a ``with`` block, so a test can create sockets there and use them
from trio in the test process), :func:`tcp_connect` and :func:`tcp_listen`.

Faults on the links (tests/e2e/test_faults_netem.py): :meth:`Topology.impaired`
(loss, delay with jitter, reordering on every veth end) and
:meth:`Topology.set_link` (a link down, then up with its addresses and routes
back). This kernel has no ``sch_netem`` (CONFIG_NET_SCH_NETEM is off), so the
impairment is built from what it has: nftables ``numgen random`` drops packets
and sorts the rest at random into HTB classes of different rates, so a packet
waits its class's serialisation time (0 to ~12 ms for a full segment, plus the
class's queue): that is the delay and its jitter, and a packet overtaken by one
in a faster class arrives out of order.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()

CLIENT4, CLIENT6 = "198.18.0.2", "fd00::2"
GW_CLIENT_SIDE4, GW_CLIENT_SIDE6 = "198.18.0.1", "fd00::1"
GW_BACKEND_SIDE4, GW_BACKEND_SIDE6 = "198.18.1.1", "fd00:1::1"
BACKEND4, BACKEND6 = "198.18.1.2", "fd00:1::2"
SERVICES4, SERVICES6 = "198.18.2.0/24", "fd00:2::/64"
ELSEWHERE4, ELSEWHERE6 = "198.18.3.10", "fd00:3::10"

# What each veth end holds, so a link brought down can be given back exactly (the
# kernel drops IPv6 addresses of a device that goes down, and routes through it).
_ADDRESSES = {
    "cli0": (f"{CLIENT4}/24", f"{CLIENT6}/64"),
    "gw-cli": (f"{GW_CLIENT_SIDE4}/24", f"{GW_CLIENT_SIDE6}/64"),
    "gw-be": (f"{GW_BACKEND_SIDE4}/24", f"{GW_BACKEND_SIDE6}/64"),
    "be0": (f"{BACKEND4}/24", f"{BACKEND6}/64"),
}
_ROUTES = {
    "cli0": (("default", "via", GW_CLIENT_SIDE4), ("default", "via", GW_CLIENT_SIDE6)),
    "be0": (("default", "via", GW_BACKEND_SIDE4), ("default", "via", GW_BACKEND_SIDE6)),
    "gw-be": (("198.18.3.0/24", "via", BACKEND4), ("fd00:3::/64", "via", BACKEND6)),
}
_PEER = {"cli0": "gw-cli", "gw-cli": "cli0", "gw-be": "be0", "be0": "gw-be"}
# The impairment's HTB classes: (class id, rate, percent of the TCP packets, queue
# limit). A full 1500-byte segment waits 0, 0.12, 0.6, 1.5 or 12 ms to be sent;
# the slow classes have short queues, so a burst into them is dropped rather than
# held for seconds (that is loss as well).
_IMPAIR_CLASSES = (
    ("1:10", "10gbit", 59, 1000),
    ("1:20", "100mbit", 20, 200),
    ("1:30", "20mbit", 12, 100),
    ("1:40", "8mbit", 8, 64),
    ("1:50", "1mbit", 1, 16),
)


def ip(*args: str) -> None:
    """Run ``ip ARGS``; raise with its stderr when it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """This thread is in network namespace ``ns`` for the block, then back home.

    Sockets created in the block stay in ``ns`` for their whole life, so a test can
    make them here and use them anywhere. Keep the block synchronous: trio tasks
    running meanwhile would create their sockets in ``ns`` too.
    """
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / ns) as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def tcp_connect(ns: str, host: str, port: int, timeout: float = 5) -> trio.SocketStream:
    """A TCP connection made from namespace ``ns``."""
    with inside(ns):
        sock = trio.socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        with trio.fail_after(timeout):
            await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def tcp_socket_from(ns: str, source: str) -> trio.socket.SocketType:
    """A TCP socket of namespace ``ns`` bound to address ``source`` (any port): a
    connection from a client address of the test's choosing."""
    with inside(ns):
        sock = trio.socket.socket(family_of(source), socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_listen(ns: str, host: str, port: int, backlog: int = 128) -> trio.SocketListener:
    """A listening socket in namespace ``ns`` (pass it to ``trio.serve_listeners``)."""
    with inside(ns):
        sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@dataclass
class Topology:
    """Three namespaces (client, gateway, backend); see the module docstring."""

    client: str
    gateway: str
    backend: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.gateway, self.backend)

    @classmethod
    def create(cls) -> Topology:
        remove_stale()
        prefix = f"l4gw-{os.getpid()}-{next(_counter)}"
        topo = cls(f"{prefix}-cli", f"{prefix}-gw", f"{prefix}-be")
        try:
            topo._build()
        except BaseException:
            topo.destroy()
            raise
        return topo

    def _build(self) -> None:
        cli, gw, be = self.namespaces
        for ns in self.namespaces:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # No duplicate-address detection on the new links: a link-local address still
            # tentative cannot source the neighbour solicitation that a transparent socket's
            # first packet (from a non-local address) triggers, and the SYN waits a second.
            for scope in ("all", "default"):
                self.sysctl(ns, f"net.ipv6.conf.{scope}.accept_dad", "0")
        ip("-n", cli, "link", "add", "cli0", "type", "veth", "peer", "name", "gw-cli", "netns", gw)
        ip("-n", be, "link", "add", "be0", "type", "veth", "peer", "name", "gw-be", "netns", gw)
        for ns, dev, v4, v6 in (
            (cli, "cli0", f"{CLIENT4}/24", f"{CLIENT6}/64"),
            (gw, "gw-cli", f"{GW_CLIENT_SIDE4}/24", f"{GW_CLIENT_SIDE6}/64"),
            (gw, "gw-be", f"{GW_BACKEND_SIDE4}/24", f"{GW_BACKEND_SIDE6}/64"),
            (be, "be0", f"{BACKEND4}/24", f"{BACKEND6}/64"),
        ):
            ip("-n", ns, "addr", "add", v4, "dev", dev)
            # nodad: usable at once, no duplicate-address-detection wait.
            ip("-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", be, "addr", "add", f"{ELSEWHERE4}/32", "dev", "lo")
        ip("-n", be, "-6", "addr", "add", f"{ELSEWHERE6}/128", "dev", "lo", "nodad")
        ip("-n", cli, "route", "add", "default", "via", GW_CLIENT_SIDE4)
        ip("-n", cli, "-6", "route", "add", "default", "via", GW_CLIENT_SIDE6)
        ip("-n", be, "route", "add", "default", "via", GW_BACKEND_SIDE4)
        ip("-n", be, "-6", "route", "add", "default", "via", GW_BACKEND_SIDE6)
        ip("-n", gw, "route", "add", "198.18.3.0/24", "via", BACKEND4)
        ip("-n", gw, "-6", "route", "add", "fd00:3::/64", "via", BACKEND6)
        self.sysctl(gw, "net.ipv4.ip_forward", "1")
        self.sysctl(gw, "net.ipv6.conf.all.forwarding", "1")

    def sysctl(self, ns: str, key: str, value: str) -> None:
        """Set ``key`` (dotted, as ``sysctl`` spells it) in namespace ``ns``."""
        path = Path("/proc/sys", *key.split("."))
        with inside(ns):
            # /proc/sys/net shows the namespace of the thread that opens it.
            fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def exec(
        self, ns: str, *argv: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``ns`` and capture its output."""
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def popen(self, ns: str, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        """Start a long-running process inside ``ns``; :meth:`destroy` kills it."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    @property
    def veths(self) -> tuple[tuple[str, str], ...]:
        """(namespace, device) of every veth end: both ends of both links."""
        return (
            (self.client, "cli0"),
            (self.gateway, "gw-cli"),
            (self.gateway, "gw-be"),
            (self.backend, "be0"),
        )

    def set_link(self, dev: str, up: bool) -> None:
        """Take veth end ``dev`` (``cli0``, ``gw-cli``, ``gw-be``, ``be0``) down or up.

        Down cuts the link: its peer loses carrier and nothing passes either way.
        Up also puts back, on both ends, what the kernel removed meanwhile (the
        IPv6 addresses and the routes through the device), so the topology is as
        built again; TCP connections that were open survive if their retries last.
        """
        ns = dict((d, n) for n, d in self.veths)[dev]
        ip("-n", ns, "link", "set", dev, "up" if up else "down")
        if not up:
            return
        for end in (dev, _PEER[dev]):
            end_ns = dict((d, n) for n, d in self.veths)[end]
            v4, v6 = _ADDRESSES[end]
            ip("-n", end_ns, "addr", "replace", v4, "dev", end)
            ip("-n", end_ns, "-6", "addr", "replace", v6, "dev", end, "nodad")
            for route in _ROUTES.get(end, ()):
                family = "-6" if ":" in route[-1] else "-4"
                ip("-n", end_ns, family, "route", "replace", *route)

    @contextmanager
    def impaired(self, loss_percent: float = 5.0) -> Iterator[Impairment]:
        """Loss, delay with jitter and reordering of TCP on every veth end, for the block.

        Each end drops ``loss_percent`` of the TCP packets it sends and sorts the rest
        at random into the HTB classes of ``_IMPAIR_CLASSES`` (see the module
        docstring: this kernel has no netem). GSO is limited to one segment per
        packet meanwhile, so loss and delay hit segments, not 64 KiB bursts. The
        qdiscs, the nftables tables and the GSO limit are removed on the way out,
        whatever happened in the block.
        """
        impairment = Impairment(self, f"l4gw_impair_{os.getpid()}")
        try:
            impairment.apply(loss_percent)
            yield impairment
        finally:
            impairment.remove()

    def destroy(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces:
            _kill_all_in(ns)
            if (NETNS_DIR / ns).exists():
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@dataclass
class Impairment:
    """The qdiscs and nftables rules :meth:`Topology.impaired` installs, and what they did."""

    topology: Topology
    table: str

    def apply(self, loss_percent: float) -> None:
        permyriad = round(loss_percent * 100)
        shares, low = [], 0
        for classid, _, percent, _ in _IMPAIR_CLASSES:
            shares.append(f"{low}-{low + percent - 1} : {classid}")
            low += percent
        assert low == 100
        rules = f"""
table inet {self.table} {{
    chain postrouting {{
        type filter hook postrouting priority 0; policy accept;
        meta l4proto tcp numgen random mod 10000 < {permyriad} counter drop
        meta l4proto tcp meta priority set numgen random mod 100 map {{ {", ".join(shares)} }}
    }}
}}
"""
        for ns in self.topology.namespaces:
            result = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=rules, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if result.returncode:
                raise RuntimeError(f"nft in {ns}: {result.stderr.strip()}")
        for ns, dev in self.topology.veths:
            ip("-n", ns, "link", "set", dev, "gso_max_segs", "1")
            _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
            for classid, rate, _, limit in _IMPAIR_CLASSES:
                _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", classid,
                    "htb", "rate", rate, "ceil", rate)  # fmt: skip
                handle = classid.split(":")[1] + ":"
                _tc(ns, "qdisc", "add", "dev", dev, "parent", classid, "handle", handle,
                    "pfifo", "limit", str(limit))  # fmt: skip

    def remove(self) -> None:
        """Undo :meth:`apply`, also a half-done one; never raises."""
        for ns, dev in self.topology.veths:
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=10)  # fmt: skip
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "gso_max_segs", "65535"],
                           capture_output=True, timeout=10)  # fmt: skip
        for ns in self.topology.namespaces:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet",
                            self.table], capture_output=True, timeout=10)  # fmt: skip

    def dropped(self) -> int:
        """TCP packets dropped so far, all namespaces together."""
        total = 0
        for ns in self.topology.namespaces:
            out = self.topology.exec(ns, "nft", "-j", "list", "table", "inet", self.table)
            for item in json.loads(out.stdout)["nftables"]:
                for expr in item.get("rule", {}).get("expr", ()):
                    if "counter" in expr:
                        total += expr["counter"]["packets"]
        return total

    def delayed(self) -> int:
        """Packets that went through a slow class (delayed, maybe reordered) so far."""
        total = 0
        for ns, dev in self.topology.veths:
            # Each class has its own pfifo, handle "<minor>:"; "10:" is the fast one.
            out = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
            for qdisc in json.loads(out.stdout or "[]"):
                if qdisc.get("kind") == "pfifo" and qdisc.get("handle") != "10:":
                    total += qdisc.get("packets", 0)
        return total


def _tc(ns: str, *args: str) -> None:
    result = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, timeout=10)
    if result.returncode:
        raise RuntimeError(f"tc -n {ns} {' '.join(args)}: {result.stderr.strip()}")


def _kill_all_in(ns: str) -> None:
    """SIGKILL processes still in ``ns`` (a gateway a test started and lost track of)."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        m = re.fullmatch(r"l4gw-(\d+)-\d+-(cli|gw|be)", entry.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_all_in(entry.name)
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True, timeout=10)


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A fresh three-namespace topology, always removed.

    Use it with ``from netns import topology`` in a test module (or a conftest).
    """
    topo = Topology.create()
    try:
        yield topo
    finally:
        topo.destroy()
