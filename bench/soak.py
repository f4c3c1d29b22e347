#!/usr/bin/env python3
"""Soak: mixed load on a two-worker gateway for minutes; does it stay flat?

One run starts real backends (nginx for HTTP, bench/relay_tiers.py's TCP echo
server for transfers, bench/udp.py's UDP echo) and ``l4gw run`` with ``[gateway]
workers = 2``, an ``[admin]`` endpoint and a relay status directory, all on
127.0.0.1. For ``--duration`` seconds it then applies, at once:

* ``keepalive``: wrk with 4 keepalive connections, each paced to one request per
  5 ms, in runs of up to 10 s (the relay plugin moves these long-lived
  request/response flows to sockmap after 1 s);
* ``close``: a new connection per HTTP request (``Connection: close``), paced;
* ``udp``: request/response datagrams over 4 sessions, each socket replaced after
  50 requests so sessions keep being created and expiring;
* ``bulk``: 8 MiB each way through the echo server, one transfer at a time (the
  default relay policy promotes it after 256 KiB and, moving faster than 16 MiB/s,
  to splice), and ``short``: 2 KiB echo transfers, paced, that stay in copy;
* a reload (SIGHUP after replacing the file atomically) every 30 s: the route's
  weights and ``[plugin.relay] promote_after_bytes`` change, which every worker's
  relay status file shows, so each worker is checked to run the file's config
  (within 5 s of a SIGHUP; at once for a worker started after it);
* a SIGKILL of one worker (a child of the supervisor) every 150 s; the
  supervisor restarts it. By default the worker killed is the one that does not
  serve the admin endpoint and UDP, so the other worker and the supervisor are
  watched for the whole run (``--kill alternate`` takes turns).

Every few seconds it samples RSS and open fds of the supervisor and each worker
(/proc), the open flows (admin ``/connections``, each worker's relay status file),
``/metrics`` (open connections, connections spliced by tier) and each load's
counts and errors. At the end of the warm-up and at the end of the run the load
pauses and the gateway goes idle: those two idle points give each process's fds
at rest. The summary: per process, RSS and fds at the start and end of the steady
part (after the warm-up), their slope per minute and max-min; requests per load;
errors, those in a window around a worker kill (expected: the kill cuts them)
apart from the others; reloads and kills. The verdict:

* **flat** when every process watched for at least 5 minutes after its warm-up
  grew by less than ``--rss-limit`` (1 MiB/min) and every process's fds at the
  final idle point are back at the first idle point's (per worker slot, so a
  restarted worker is compared with its predecessor);
* errors beyond the injected ones must be zero (a separate line): those of the
  loads outside the kill windows, a worker running another config than the file's,
  ERROR lines and tracebacks in the gateway's log (but the supervisor's line for
  each kill), admin requests that failed, a worker dying by itself, a kill not
  followed by a restart.

    .venv/bin/python bench/soak.py                        # 10 minutes
    .venv/bin/python bench/soak.py --duration 20          # smoke (schedules scale down)
    .venv/bin/python bench/soak.py --json soak.json --csv soak.csv --keep
    .venv/bin/python bench/soak.py --gateway-src /tmp/snapshot   # a copy of the tree, as run.py

Rules kept here: traffic on 127.0.0.1 only; every loop is bounded in rate and
each operation in time (connect, transfer, wrk run), and all stop by themselves
at the end; every child process is stopped on exit (bench/peers.py Children).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LoadFailed, parse_wrk
from peers import (
    LOOPBACK,
    ROOT,
    Child,
    Children,
    child_pids,
    fd_count,
    free_port,
    listening_inodes,
    rss_kib,
    socket_inodes,
    start_nginx,
)
from script import interrupt_on_sigterm, missing_tools, write_report
from udp import bound_udp_ports, free_udp_port

BENCH = Path(__file__).resolve().parent
WORKERS = 2
RSS_LIMIT_KIB_PER_MIN = 1024.0
"""A process is flat when its RSS grew slower than this after its warm-up."""
MIN_SPAN_FOR_SLOPE = 300.0
"""Seconds of steady samples a process needs for its RSS slope to count in the verdict."""
FD_TOLERANCE = 0
"""fds at the final idle point may exceed the first idle point's by this many."""
KILL_GRACE = 2.0
"""Seconds after a killed worker's successor listens during which errors still count
as the kill's (a UDP request sent before it needs its 1 s timeout to fail)."""
RELOAD_GRACE = 5.0
"""Seconds a worker may take to show a reload (its status file is rewritten each second)."""
CONFIG_VARIANTS = ((1, 256), (2, 320), (3, 384))
"""(weight of http_a, promote_after_bytes in KiB): variant 0 at start, then 1, 2, 1, ..."""
WRK_DELAY_MS = 5
WRK_CONNECTIONS = 4
CLOSE_RATE = 40.0
UDP_RATE = 100.0
UDP_SESSIONS = 4
UDP_REQUESTS_PER_SOCKET = 50
UDP_TIMEOUT = 1.0
SHORT_RATE = 20.0
SHORT_SIZE = 2048
OP_TIMEOUT = 5.0
BULK_TIMEOUT = 60.0
HTTP_BODY = b"hello from the bench backend"


# --- the gateway's configuration -----------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """Every port of one run."""

    admin: int
    http: int
    echo: int
    udp: int
    nginx: int
    echo_backend: int
    udp_backend: int


def gateway_config(ports: Ports, status_dir: Path, variant: int) -> str:
    """The soak's gateway: two workers, admin on, three listeners.

    Variants differ in the HTTP route's weights and in ``promote_after_bytes``:
    valid either way, and the second one is visible in each worker's status file.
    """
    weight, promote_kib = CONFIG_VARIANTS[variant]
    return f"""
[gateway]
workers = {WORKERS}
drain_timeout = "2s"
log_level = "info"

[admin]
bind = "{LOOPBACK}:{ports.admin}"

[plugin.relay]
status_dir = "{status_dir}"
promote_after_bytes = "{promote_kib}KiB"

[[listener]]
name = "http"
bind = "{LOOPBACK}:{ports.http}"

[[route]]
listener = "http"
clusters = [{{cluster = "http_a", weight = {weight}}}, {{cluster = "http_b", weight = 1}}]

[cluster.http_a]
endpoints = ["{LOOPBACK}:{ports.nginx}"]
idle_timeout = "60s"

[cluster.http_b]
endpoints = ["{LOOPBACK}:{ports.nginx}"]
idle_timeout = "60s"

[[listener]]
name = "echo"
bind = "{LOOPBACK}:{ports.echo}"

[[route]]
listener = "echo"
cluster = "echo"

[cluster.echo]
endpoints = ["{LOOPBACK}:{ports.echo_backend}"]
idle_timeout = "60s"

[[listener]]
name = "udp"
bind = "{LOOPBACK}:{ports.udp}"
protocol = "udp"
session_idle_timeout = "3s"

[[route]]
listener = "udp"
cluster = "udp"

[cluster.udp]
endpoints = ["{LOOPBACK}:{ports.udp_backend}"]
"""


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reload never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- load generators ----------------------------------------------------------------------


class Gate:
    """Lets the load loops run, pause (for an idle point) and stop."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._paused = False
        self._stopped = False
        self._parked: set[str] = set()

    def proceed(self, name: str) -> bool:
        """Between two operations of loop ``name``: wait while paused; False once stopped."""
        with self._cond:
            while self._paused and not self._stopped:
                self._parked.add(name)
                self._cond.notify_all()
                self._cond.wait()
            self._parked.discard(name)
            return not self._stopped

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once for a pause or the stop."""
        if seconds > 0:
            self._wake.wait(seconds)

    def pause(self, loops: list[threading.Thread], timeout: float) -> bool:
        """Pause; True once every live loop is parked (within ``timeout``)."""
        names = {t.name for t in loops if t.is_alive()}
        deadline = time.monotonic() + timeout
        with self._cond:
            self._paused = True
            self._wake.set()
            while not names <= self._parked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
                names = {n for n in names if any(t.name == n and t.is_alive() for t in loops)}
            return True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            if not self._stopped:
                self._wake.clear()
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._wake.set()
            self._cond.notify_all()


@dataclass
class Load:
    """What one load generator did: operations done, bytes, errors with their times."""

    name: str
    unit: str
    done: int = 0
    bytes: int = 0
    errors: list[tuple[float, float, int, str]] = field(default_factory=list)
    """(start, end, count, what): one operation's error (count 1), or a wrk run's."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, count: int = 1, nbytes: int = 0) -> None:
        with self.lock:
            self.done += count
            self.bytes += nbytes

    def error(self, start: float, end: float, what: str, count: int = 1) -> None:
        with self.lock:
            self.errors.append((start, end, count, what))

    def error_count(self) -> int:
        with self.lock:
            return sum(e[2] for e in self.errors)


def _paced(gate: Gate, name: str, rate: float, until: float, op: Callable[[], None]) -> None:
    """Run ``op`` about ``rate`` times a second until ``until`` (monotonic) or the stop."""
    period = 1.0 / rate
    next_at = time.monotonic()
    while gate.proceed(name) and time.monotonic() < until:
        op()
        next_at = max(next_at + period, time.monotonic() - 1.0)
        gate.sleep(next_at - time.monotonic())


def wrk_loop(load: Load, gate: Gate, port: int, until: float, run: float, script: Path) -> None:
    """wrk runs of ``run`` seconds (fewer at the end) with a pause of 1 s between."""
    while gate.proceed(load.name):
        seconds = min(run, until - time.monotonic())
        if seconds < 1:
            return
        argv = ["wrk", "--latency", "-c", str(WRK_CONNECTIONS), "-t", "1"]
        argv += ["-d", f"{int(seconds)}s", "--timeout", "10s", "-s", str(script)]
        argv.append(f"http://{LOOPBACK}:{port}/")
        t0 = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
            if done.returncode != 0:
                raise LoadFailed(f"wrk exited {done.returncode}: {done.stderr[-300:]}")
            m = parse_wrk(done.stdout)
        except (LoadFailed, ValueError, subprocess.TimeoutExpired) as exc:
            load.error(t0, time.monotonic(), f"wrk: {exc}"[:200])
        else:
            load.ok(int(m["requests"]))
            for key in ("connect_errors", "read_errors", "write_errors", "timeouts", "non_2xx"):
                if m[key]:
                    load.error(t0, time.monotonic(), f"wrk {key}", int(m[key]))
        gate.sleep(1.0)


def http_close(load: Load, port: int) -> None:
    """One GET on a new connection with ``Connection: close``; the 200 and body checked."""
    t0 = time.monotonic()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=OP_TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
                if len(data) > 65536:
                    break
        if not data.startswith(b"HTTP/1.1 200") or HTTP_BODY not in data:
            raise ValueError(f"bad response {data[:60]!r}")
    except (OSError, ValueError) as exc:
        load.error(t0, time.monotonic(), _what(exc))
    else:
        load.ok(1, len(data))


class UdpClient:
    """Request/response datagrams over a few sessions, each replaced now and then."""

    def __init__(self, load: Load, port: int) -> None:
        self.load = load
        self.port = port
        self.socks: list[socket.socket | None] = [None] * UDP_SESSIONS
        self.used = [0] * UDP_SESSIONS
        self.seq = 0

    def once(self) -> None:
        i = self.seq % UDP_SESSIONS
        self.seq += 1
        sock = self.socks[i]
        if sock is None or self.used[i] >= UDP_REQUESTS_PER_SOCKET:
            if sock is not None:
                sock.close()
            sock = self.socks[i] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((LOOPBACK, self.port))
            self.used[i] = 0
        self.used[i] += 1
        msg = b"soak %d" % self.seq
        t0 = time.monotonic()
        try:
            sock.send(msg)
            deadline = t0 + UDP_TIMEOUT
            while True:  # a late reply to an earlier request is skipped
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                if sock.recv(2048) == msg:
                    break
        except OSError as exc:
            self.load.error(t0, time.monotonic(), _what(exc))
            # A new session next time: this one may be gone with a killed worker.
            sock.close()
            self.socks[i] = None
        else:
            self.load.ok(1, len(msg))

    def close(self) -> None:
        for sock in self.socks:
            if sock is not None:
                sock.close()


_BLOCK = os.urandom(1 << 20)


def echo_transfer(port: int, size: int, timeout: float) -> None:
    """Send ``size`` bytes through the echo server while reading them back, then
    half-close and wait for its EOF; the echo must equal what was sent (CRC-32).

    Raises:
        OSError, ValueError: the transfer failed, timed out or came back different.
    """
    deadline = time.monotonic() + timeout
    block = memoryview(_BLOCK)
    sent = received = 0
    crc_sent = crc_received = 0
    with (
        socket.create_connection((LOOPBACK, port), timeout=OP_TIMEOUT) as s,
        selectors.DefaultSelector() as sel,
    ):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        eof = False
        while not eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"transfer timed out: sent {sent}, received {received}")
            for _, mask in sel.select(min(left, 1.0)):
                if mask & selectors.EVENT_WRITE and sent < size:
                    off = sent % len(_BLOCK)
                    chunk = block[off : off + min(size - sent, len(_BLOCK) - off, 256 << 10)]
                    with contextlib.suppress(BlockingIOError):
                        n = s.send(chunk)
                        crc_sent = zlib.crc32(chunk[:n], crc_sent)
                        sent += n
                    if sent == size:
                        s.shutdown(socket.SHUT_WR)
                        sel.modify(s, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(256 << 10)
                    except BlockingIOError:
                        continue
                    if not data:
                        eof = True
                        break
                    received += len(data)
                    crc_received = zlib.crc32(data, crc_received)
    if received != size or crc_received != crc_sent:
        raise ValueError(f"echo differs: sent {sent}, received {received}")


def echo_once(load: Load, port: int, size: int, timeout: float) -> None:
    t0 = time.monotonic()
    try:
        echo_transfer(port, size, timeout)
    except (OSError, ValueError) as exc:
        load.error(t0, time.monotonic(), _what(exc))
    else:
        load.ok(1, 2 * size)


def _guarded(load: Load, body: Callable[[], None]) -> None:
    """Run a load loop; a bug that ends it early is an error of that load, not silence."""
    t0 = time.monotonic()
    try:
        body()
    except Exception as exc:
        load.error(t0, time.monotonic(), f"the {load.name} loop crashed: {_what(exc)}")


def _what(exc: BaseException) -> str:
    """An error's kind for the summary: its class and, for OS errors, the errno name."""
    if isinstance(exc, OSError) and exc.errno is not None:
        import errno as errno_mod

        return f"{type(exc).__name__} {errno_mod.errorcode.get(exc.errno, exc.errno)}"
    return f"{type(exc).__name__}: {str(exc)[:80]}"


# --- sampling -----------------------------------------------------------------------------


@dataclass
class Kill:
    at: float
    pid: int
    role: str
    ready_at: float | None = None
    new_pid: int | None = None

    def window(self) -> tuple[float, float]:
        end = (self.ready_at if self.ready_at is not None else self.at + 30.0) + KILL_GRACE
        return self.at - 0.5, end


@dataclass
class Reload:
    at: float
    variant: int
    wall: float
    """time.time() of the SIGHUP (status files carry wall-clock times)."""
    workers: tuple[int, ...] = ()
    """The workers running when the SIGHUP was sent."""
    confirmed: dict[int, float] = field(default_factory=dict)
    """Worker pid -> seconds after the SIGHUP its status file showed the new config
    (a worker started later shows it in its first status file)."""

    def latency(self, killed: set[int]) -> float | None:
        """Seconds until every worker that got the SIGHUP (and was not killed before
        showing it) showed the new config; None when one never did."""
        needed = [p for p in self.workers if p not in killed or p in self.confirmed]
        if not all(p in self.confirmed for p in needed):
            return None
        return max((self.confirmed[p] for p in needed), default=0.0)


class Soak:
    """One run: the processes, the loads, the schedule, the samples."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.children = Children(workdir)
        self.status_dir = workdir / "status"
        self.config_path = workdir / "gateway.toml"
        self.gate = Gate()
        self.loads = {
            "keepalive": Load("keepalive", "requests"),
            "close": Load("close", "requests"),
            "udp": Load("udp", "replies"),
            "bulk": Load("bulk", "transfers"),
            "short": Load("short", "transfers"),
        }
        self.t0 = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.kills: list[Kill] = []
        self.reloads: list[Reload] = []
        self.variant = 0
        self.idle: dict[str, dict[str, Any]] = {}
        self.sampler_errors: list[tuple[float, str]] = []
        self.divergences: list[dict[str, Any]] = []
        self.first_seen: dict[int, float] = {}
        self.known: set[int] = set()
        """Workers seen listening (a new one is a restarted one)."""
        self.slots: dict[str, int] = {}
        """``worker0``/``worker1`` -> the pid in that slot now."""
        self.died: set[int] = set()
        self.tier_totals: dict[int, dict[str, int]] = {}
        self.spliced: dict[int, dict[str, float]] = {}
        self.threads: list[threading.Thread] = []
        self.gateway: Child | None = None
        self.gateway_exit: int | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        tcp = [free_port() for _ in range(5)]
        udp = [free_udp_port() for _ in range(2)]
        self.ports = Ports(tcp[0], tcp[1], tcp[2], udp[0], tcp[3], tcp[4], udp[1])
        start_nginx(self.children, self.ports.nginx)
        echo = self.children.start(
            "echo",
            [
                sys.executable,
                str(BENCH / "relay_tiers.py"),
                "--echo-server",
                str(self.ports.echo_backend),
            ],
        )
        echo.wait_listening([self.ports.echo_backend])
        udp_backend = self.children.start(
            "udp-backend", [sys.executable, str(BENCH / "udp.py"), "_backend", str(udp[1])]
        )
        self._wait(lambda: udp[1] in bound_udp_ports(), udp_backend, "UDP backend")
        self.status_dir.mkdir()
        self.config_path.write_text(gateway_config(self.ports, self.status_dir, 0))
        src = self.args.gateway_src
        gw = self.children.start(
            "gateway",
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config_path)],
            cwd=src or ROOT,
            env={"PYTHONPATH": str(src)} if src else None,
        )
        self.gateway = gw
        gw.wait_listening([self.ports.http, self.ports.echo, self.ports.admin], timeout=30)
        self._wait(lambda: len(self.listening_workers()) == WORKERS, gw, "both workers")
        self._wait(lambda: self.ports.udp in bound_udp_ports(), gw, "the UDP listener")
        self._wait(lambda: all(self.status(p) for p in self.workers()), gw, "status files")
        self.assign_slots()
        self.t0 = time.monotonic()

    def _wait(self, ready: Callable[[], bool], child: Child, what: str) -> None:
        deadline = time.monotonic() + 30
        while not ready():
            child.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready:\n{child.log()[-3000:]}")
            time.sleep(0.05)

    # -- the gateway's processes ----------------------------------------------------------

    @property
    def supervisor(self) -> int:
        assert self.gateway is not None
        return self.gateway.pid

    def workers(self) -> list[int]:
        return child_pids(self.supervisor)

    def listening_workers(self) -> list[int]:
        """Workers holding a listening socket of the HTTP listener (ready to serve)."""
        inodes = listening_inodes(self.ports.http)
        return [p for p in self.workers() if socket_inodes(p) & inodes]

    def assign_slots(self) -> None:
        """Name the first workers: worker0 holds the admin endpoint's socket (it is the
        supervisor's worker 0, which also serves UDP), worker1 the other one."""
        admin = listening_inodes(self.ports.admin)
        workers = self.workers()
        first = [p for p in workers if socket_inodes(p) & admin]
        rest = sorted(p for p in workers if p not in first)
        self.slots = {f"worker{i}": pid for i, pid in enumerate(first[:1] + rest)}
        self.known.update(workers)

    def roles(self) -> dict[str, int]:
        """``{"supervisor": pid, "worker0": pid, ...}`` for the processes alive now (a
        killed worker's slot is empty until its successor listens)."""
        alive = set(self.workers())
        out = {"supervisor": self.supervisor}
        out.update({role: pid for role, pid in self.slots.items() if pid in alive})
        return out

    def status(self, pid: int) -> dict[str, Any] | None:
        """The relay plugin's status file of worker ``pid`` (written each second)."""
        try:
            doc: dict[str, Any] = json.loads((self.status_dir / f"{pid}.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    def admin_get(self, path: str) -> str:
        conn = http.client.HTTPConnection(LOOPBACK, self.ports.admin, timeout=3)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode()
            if response.status != 200:
                raise OSError(f"{path}: HTTP {response.status}")
            return body
        finally:
            conn.close()

    # -- one sample -----------------------------------------------------------------------

    def sample(self, phase: str) -> dict[str, Any]:
        t = self.now()
        row: dict[str, Any] = {"t": round(t, 2), "phase": phase}
        roles = self.roles()
        for role, pid in roles.items():
            self.first_seen.setdefault(pid, t)
            row[f"{role}_pid"] = pid
            row[f"{role}_rss_kib"] = rss_kib(pid)
            row[f"{role}_fds"] = fd_count(pid)
            if role != "supervisor":
                status = self.status(pid)
                if status is not None:
                    tiers = status["tiers"]
                    row[f"{role}_flows"] = sum(v["flows_now"] for v in tiers.values())
                    # Every TCP flow the relay plugin moves starts in copy.
                    row[f"{role}_flows_total"] = tiers["copy"]["flows_total"]
                    self.tier_totals[pid] = {n: v["flows_total"] for n, v in tiers.items()}
                    pab = status["policy"]["promote_after_bytes"]
                    self._check_config(pid, t, pab, status["updated"])
        try:
            row["admin_connections"] = json.loads(self.admin_get("/connections"))["count"]
            metrics = self.admin_get("/metrics")
        except (OSError, ValueError, KeyError) as exc:
            self.sampler_errors.append((t, f"admin: {_what(exc)}"))
        else:
            row["metric_active"] = _metric_sum(metrics, "l4gw_connection_active")
            spliced = _metric_by(metrics, "l4gw_connection_spliced_total", "l4gw_tier")
            row["metric_spliced"] = sum(spliced.values())
            if "worker0" in roles:
                self.spliced[roles["worker0"]] = spliced
        for name, load in self.loads.items():
            row[f"{name}_done"] = load.done
            row[f"{name}_errors"] = load.error_count()
        self.rows.append(row)
        return row

    def _check_config(self, pid: int, t: float, promote_after_bytes: int, updated: float) -> None:
        """Each worker runs the config in the file once it had time to read it."""
        want = CONFIG_VARIANTS[self.variant][1] << 10
        last = self.reloads[-1] if self.reloads else None
        if promote_after_bytes == want:
            if last is not None and pid not in last.confirmed:
                last.confirmed[pid] = round(t - last.at, 2)
            return
        # A status file written well after the last SIGHUP shows the config the
        # worker runs then, which must be the file's: a worker forked after a reload
        # shows it in its first status file. One written before, or right after, the
        # SIGHUP may predate its handling; RELOAD_GRACE bounds that.
        reloading = last is not None and updated < last.wall + 0.5 and t < last.at + RELOAD_GRACE
        seen = {(d["pid"], d["variant"]) for d in self.divergences}
        if not reloading and (pid, self.variant) not in seen:
            self.divergences.append(
                {
                    "t": round(t, 2),
                    "pid": pid,
                    "variant": self.variant,
                    "file_promote_after_bytes": want,
                    "worker_promote_after_bytes": promote_after_bytes,
                }
            )

    # -- injected events ------------------------------------------------------------------

    def reload(self) -> None:
        self.variant = 1 + len(self.reloads) % 2
        write_atomically(
            self.config_path, gateway_config(self.ports, self.status_dir, self.variant)
        )
        workers = tuple(self.slots.values())
        self.reloads.append(Reload(self.now(), self.variant, time.time(), workers))
        os.kill(self.supervisor, signal.SIGHUP)

    def kill(self) -> None:
        roles = self.roles()
        role = "worker1"
        if self.args.kill == "alternate" and len(self.kills) % 2 == 1:
            role = "worker0"
        pid = roles.get(role)
        if pid is None:
            self.sampler_errors.append((self.now(), f"kill: no {role} to kill"))
            return
        os.kill(pid, signal.SIGKILL)
        self.kills.append(Kill(self.now(), pid, role))
        _log(f"t={self.now():.0f}s killed {role} (pid {pid})")

    def watch_reload(self) -> None:
        """Until every worker shows the last reload, read their status files each tick
        (they are rewritten each second): how long a reload takes to apply."""
        last = self.reloads[-1] if self.reloads else None
        if last is None or self.now() > last.at + 2 * RELOAD_GRACE:
            return
        for pid in self.slots.values():
            if pid not in last.confirmed and (status := self.status(pid)) is not None:
                pab = status["policy"]["promote_after_bytes"]
                self._check_config(pid, self.now(), pab, status["updated"])

    def watch_restarts(self) -> None:
        """Give a new listening worker the slot of the worker it replaces; a worker
        that died without being killed here is an unexpected error."""
        alive = set(self.workers())
        killed = {k.pid for k in self.kills}
        for role, pid in self.slots.items():
            if pid not in alive and pid not in killed and pid not in self.died:
                self.died.add(pid)
                self.sampler_errors.append((self.now(), f"{role} (pid {pid}) died by itself"))
        for pid in self.listening_workers():
            if pid in self.known:
                continue
            empty = [role for role, old in self.slots.items() if old not in alive]
            if not empty:
                continue
            self.known.add(pid)
            old = self.slots[empty[0]]
            self.slots[empty[0]] = pid
            for k in self.kills:
                if k.pid == old:
                    k.new_pid, k.ready_at = pid, self.now()
            _log(f"t={self.now():.0f}s {empty[0]} (pid {old}) restarted as pid {pid}")

    # -- idle points ----------------------------------------------------------------------

    def idle_point(self, name: str) -> None:
        """Pause the loads, wait until no flow is open and the fds stopped moving,
        and keep that sample as ``name``."""
        t_pause = self.now()
        if not self.gate.pause(self.threads, timeout=30):
            self.sampler_errors.append((self.now(), f"{name}: the loads did not pause"))
        deadline = time.monotonic() + 30
        previous: dict[str, Any] | None = None
        while True:
            row = self.sample(name)
            flows = [row.get(f"worker{i}_flows") for i in range(WORKERS)]
            quiet = row.get("admin_connections") == 0 and all(f == 0 for f in flows)
            stable = previous is not None and all(
                row.get(f"{r}_fds") == previous.get(f"{r}_fds") for r in ("supervisor", *_workers())
            )
            if quiet and stable:
                break
            if time.monotonic() > deadline:
                self.sampler_errors.append((self.now(), f"{name}: not idle after 30 s"))
                break
            previous = row
            time.sleep(1.0)
        self.idle[name] = {**row, "waited": round(self.now() - t_pause, 1)}
        _log(f"t={self.now():.0f}s {name}: " + _row_text(row))
        self.gate.resume()

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        a = self.args
        end = time.monotonic() + a.duration
        p = self.ports
        script = self.workdir / "delay.lua"
        script.write_text(f"function delay()\n  return {WRK_DELAY_MS}\nend\n")
        udp = UdpClient(self.loads["udp"], p.udp)
        loops: dict[str, Callable[[], None]] = {
            "keepalive": lambda: wrk_loop(
                self.loads["keepalive"], self.gate, p.http, end, a.wrk_run, script
            ),
            "close": lambda: _paced(
                self.gate, "close", CLOSE_RATE, end, lambda: http_close(self.loads["close"], p.http)
            ),
            "udp": lambda: _paced(self.gate, "udp", UDP_RATE, end, udp.once),
            "bulk": lambda: _paced(
                self.gate,
                "bulk",
                1.0,
                end,
                lambda: echo_once(self.loads["bulk"], p.echo, a.bulk_size, BULK_TIMEOUT),
            ),
            "short": lambda: _paced(
                self.gate,
                "short",
                SHORT_RATE,
                end,
                lambda: echo_once(self.loads["short"], p.echo, SHORT_SIZE, OP_TIMEOUT),
            ),
        }
        self.sample("start")
        for name, body in loops.items():
            thread = threading.Thread(
                target=_guarded, args=(self.loads[name], body), name=name, daemon=True
            )
            self.threads.append(thread)
            thread.start()
        kills = self.kill_times()
        next_sample, next_reload = 0.0, a.reload_every
        warm = False
        try:
            while time.monotonic() < end:
                t = self.now()
                assert self.gateway is not None
                self.gateway.check_alive()
                if not warm and t >= a.warmup:
                    warm = True
                    self.idle_point("idle-start")
                    continue
                if t >= next_sample:
                    row = self.sample("warmup" if not warm else "steady")
                    next_sample = max(next_sample + a.sample_every, t)
                    if len(self.rows) % max(1, round(30 / a.sample_every)) == 0:
                        _log(f"t={t:.0f}s " + _row_text(row))
                if t >= next_reload:
                    self.reload()
                    # From now, not from when it was due: after an idle point the
                    # reloads do not come in a burst.
                    next_reload = t + a.reload_every
                if kills and t >= kills[0]:
                    kills.pop(0)
                    self.kill()
                self.watch_restarts()
                self.watch_reload()
                time.sleep(0.1)
        finally:
            self.gate.stop()
            for thread in self.threads:
                thread.join(timeout=BULK_TIMEOUT + 5)
            udp.close()
        self.watch_restarts()
        self.idle_point("idle-end")

    def kill_times(self) -> list[float]:
        a = self.args
        if a.kill_every <= 0:
            return []
        times: list[float] = []
        t = a.warmup + a.kill_every / 2
        last = a.duration - min(20.0, a.duration / 4)
        while t <= last:
            times.append(t)
            t += a.kill_every
        return times

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.children.stop(self.gateway, timeout=15)
            self.gateway_exit = self.gateway.proc.returncode

    # -- the summary ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        a = self.args
        windows = [k.window() for k in self.kills]

        def injected(start: float, end: float) -> bool:
            return any(start - self.t0 <= w1 and end - self.t0 >= w0 for w0, w1 in windows)

        loads: dict[str, Any] = {}
        unexpected_total = 0
        for name, load in self.loads.items():
            expected = Counter[str]()
            unexpected = Counter[str]()
            for start, end, count, what in load.errors:
                (expected if injected(start, end) else unexpected)[what] += count
            unexpected_total += sum(unexpected.values())
            loads[name] = {
                "unit": load.unit,
                "done": load.done,
                "bytes": load.bytes,
                "errors_expected": sum(expected.values()),
                "errors_unexpected": sum(unexpected.values()),
                "expected_kinds": dict(expected.most_common(8)),
                "unexpected_kinds": dict(unexpected.most_common(8)),
                "unexpected_at": sorted(
                    {round(s - self.t0, 1) for s, e, c, w in load.errors if not injected(s, e)}
                )[:20],
            }
        sampler = [
            (t, what)
            for t, what in self.sampler_errors
            if not any(w0 <= t <= w1 for w0, w1 in windows)
        ]
        log_errors = self.log_errors()
        restarts_missing = [k.pid for k in self.kills if k.ready_at is None]
        unexpected_total += (
            len(sampler) + len(self.divergences) + len(log_errors) + len(restarts_missing)
        )
        # A reload followed by the next one within the grace is not confirmed by then,
        # nor does it have to be: the next one is.
        settled = [
            r
            for r, after in zip(self.reloads, [*self.reloads[1:], None], strict=True)
            if (after.at if after else self.now()) - r.at > RELOAD_GRACE
        ]
        killed = {k.pid for k in self.kills}
        unconfirmed = [r for r in settled if r.latency(killed) is None]
        procs = self.process_summary()
        fds_back = self.fds_back()
        judged = [p for p in procs if p["span_s"] >= MIN_SPAN_FOR_SLOPE]
        rss_flat = all(p["rss_slope_kib_min"] < a.rss_limit for p in judged)
        flat = rss_flat and all(f["back"] for f in fds_back.values()) and bool(fds_back)
        spliced: Counter[str] = Counter()
        for by_tier in self.spliced.values():
            spliced.update({k: int(v) for k, v in by_tier.items()})
        tiers: Counter[str] = Counter()
        for totals in self.tier_totals.values():
            tiers.update(totals)
        return {
            "loads": loads,
            "processes": procs,
            "fds_at_idle": fds_back,
            "reloads": {
                "sent": len(self.reloads),
                "settled": len(settled),
                "confirmed_by_every_worker": len(settled) - len(unconfirmed),
                # Up to 1 s late: a status file is rewritten each second.
                "seconds_to_confirm": [r.latency(killed) for r in self.reloads],
            },
            "kills": [
                {
                    "t": round(k.at, 1),
                    "role": k.role,
                    "pid": k.pid,
                    "new_pid": k.new_pid,
                    "restart_s": None if k.ready_at is None else round(k.ready_at - k.at, 2),
                }
                for k in self.kills
            ],
            "spliced_worker0_metric": dict(spliced),
            "flows_per_tier_all_workers": dict(tiers),
            "config_divergences": self.divergences,
            "sampler_errors": [{"t": round(t, 1), "what": w} for t, w in sampler],
            "log_errors": log_errors[:20],
            "restarts_missing": restarts_missing,
            "gateway_exit": self.gateway_exit,
            "errors_unexpected": unexpected_total,
            "errors_expected": sum(v["errors_expected"] for v in loads.values()),
            "verdict": {
                "flat": flat,
                "rss_judged": [f"{p['role']} {p['pid']}" for p in judged],
                "rss_limit_kib_min": a.rss_limit,
                "min_span_s": MIN_SPAN_FOR_SLOPE,
                "fd_tolerance": FD_TOLERANCE,
            },
        }

    def process_summary(self) -> list[dict[str, Any]]:
        """Per process (pid): the steady part's RSS and fds, start, end, slope, max-min."""
        a = self.args
        out: list[dict[str, Any]] = []
        for role in ("supervisor", *_workers()):
            pids = list(dict.fromkeys(r[f"{role}_pid"] for r in self.rows if f"{role}_pid" in r))
            for pid in pids:
                start = max(a.warmup, self.first_seen.get(pid, 0.0) + a.warmup)
                rows = [
                    r
                    for r in self.rows
                    if r.get(f"{role}_pid") == pid
                    and r["phase"] == "steady"
                    and r["t"] >= start
                    and r.get(f"{role}_rss_kib") is not None
                ]
                if len(rows) < 2:
                    out.append(
                        {
                            "role": role,
                            "pid": pid,
                            "span_s": 0.0,
                            "samples": len(rows),
                            "rss_slope_kib_min": 0.0,
                        }
                    )
                    continue
                ts = [r["t"] / 60 for r in rows]
                rss = [r[f"{role}_rss_kib"] for r in rows]
                fds = [r[f"{role}_fds"] for r in rows]
                out.append(
                    {
                        "role": role,
                        "pid": pid,
                        "from_s": rows[0]["t"],
                        "to_s": rows[-1]["t"],
                        "span_s": round(rows[-1]["t"] - rows[0]["t"], 1),
                        "samples": len(rows),
                        "rss_start_kib": rss[0],
                        "rss_end_kib": rss[-1],
                        "rss_slope_kib_min": round(_slope(ts, rss), 1),
                        "rss_range_kib": max(rss) - min(rss),
                        "fds_start": fds[0],
                        "fds_end": fds[-1],
                        "fds_slope_min": round(_slope(ts, fds), 2),
                        "fds_range": max(fds) - min(fds),
                    }
                )
        return out

    def fds_back(self) -> dict[str, Any]:
        """Per slot: fds at the final idle point against the first one's."""
        first, last = self.idle.get("idle-start"), self.idle.get("idle-end")
        if first is None or last is None:
            return {}
        out: dict[str, Any] = {}
        for role in ("supervisor", *_workers()):
            a, b = first.get(f"{role}_fds"), last.get(f"{role}_fds")
            if a is None or b is None:
                continue
            out[role] = {
                "start": a,
                "end": b,
                "rss_start_kib": first.get(f"{role}_rss_kib"),
                "rss_end_kib": last.get(f"{role}_rss_kib"),
                "same_process": first.get(f"{role}_pid") == last.get(f"{role}_pid"),
                "back": b <= a + FD_TOLERANCE,
            }
        return out

    def log_errors(self) -> list[str]:
        """ERROR lines and tracebacks in the gateway's log, but those of our kills."""
        if self.gateway is None:
            return []
        killed = {str(k.pid) for k in self.kills}
        out = []
        for line in self.gateway.log().splitlines():
            if " ERROR " not in line and not line.startswith("Traceback"):
                continue
            m = re.search(r"worker \d+ \(pid (\d+)\) exited with -9; restarting", line)
            if m and m.group(1) in killed:
                continue
            out.append(line[:300])
        return out


def _workers() -> tuple[str, ...]:
    return tuple(f"worker{i}" for i in range(WORKERS))


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def _metric_lines(text: str, name: str) -> Iterable[tuple[str, float]]:
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            yield m.group(2) or "", float(m.group(3))


def _metric_sum(text: str, name: str) -> float:
    return sum(v for _, v in _metric_lines(text, name))


def _metric_by(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _metric_lines(text, name):
        m = re.search(rf'{label}="([^"]*)"', labels)
        key = m.group(1) if m else ""
        out[key] = out.get(key, 0.0) + value
    return out


def _row_text(row: dict[str, Any]) -> str:
    parts = []
    for role in ("supervisor", *_workers()):
        if f"{role}_pid" in row:
            rss = row.get(f"{role}_rss_kib") or 0
            parts.append(f"{role} {rss / 1024:.1f} MiB {row.get(f'{role}_fds')} fds")
    parts.append(f"flows {row.get('admin_connections')}")
    return ", ".join(parts)


# --- report ---------------------------------------------------------------------------------


def report_text(summary: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"soak: {args.duration:g} s, warm-up {args.warmup:g} s, sample every "
        f"{args.sample_every:g} s, reload every {args.reload_every:g} s, "
        f"kill every {args.kill_every:g} s ({args.kill})",
        "",
        "| process | pid | steady s | RSS start MiB | RSS end MiB | RSS slope KiB/min | "
        "RSS max-min KiB | fds start | fds end | fds slope /min | fds max-min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["processes"]:
        if "rss_start_kib" not in p:
            lines.append(f"| {p['role']} | {p['pid']} | too short | | | | | | | | |")
            continue
        # A slope over less than a minute says nothing about a trend.
        shown = p["span_s"] >= 60
        rss_slope = f"{p['rss_slope_kib_min']:+.0f}" if shown else "-"
        fds_slope = f"{p['fds_slope_min']:+.2f}" if shown else "-"
        lines.append(
            f"| {p['role']} | {p['pid']} | {p['span_s']:.0f} | {p['rss_start_kib'] / 1024:.1f} | "
            f"{p['rss_end_kib'] / 1024:.1f} | {rss_slope} | {p['rss_range_kib']} | "
            f"{p['fds_start']} | {p['fds_end']} | {fds_slope} | {p['fds_range']} |"
        )
    lines += ["", "| idle fds | first idle point | final idle point | same process | back |"]
    lines.append("|---|---|---|---|---|")
    for role, f in summary["fds_at_idle"].items():
        lines.append(
            f"| {role} | {f['start']} | {f['end']} | {'yes' if f['same_process'] else 'no'} | "
            f"{'yes' if f['back'] else 'NO'} |"
        )
    lines += ["", "| load | done | errors expected (kills) | errors unexpected | kinds |"]
    lines.append("|---|---|---|---|---|")
    for name, ld in summary["loads"].items():
        kinds = {
            **ld["unexpected_kinds"],
            **{f"{k} (kill)": v for k, v in ld["expected_kinds"].items()},
        }
        text = ", ".join(f"{k}: {v}" for k, v in kinds.items())
        lines.append(
            f"| {name} | {ld['done']} {ld['unit']} | {ld['errors_expected']} | "
            f"{ld['errors_unexpected']} | {text} |"
        )
    r = summary["reloads"]
    lines += [
        "",
        f"reloads: {r['sent']} sent, {r['confirmed_by_every_worker']} of the {r['settled']} "
        f"not followed by another within {RELOAD_GRACE:g} s seen by every worker's status "
        f"(slowest {max((s for s in r['seconds_to_confirm'] if s is not None), default=0):.1f} s)",
        "kills: "
        + (
            ", ".join(
                f"t={k['t']:g}s {k['role']} restarted in {k['restart_s']} s"
                for k in summary["kills"]
            )
            or "none"
        ),
        f"connections spliced (worker0's /metrics): {summary['spliced_worker0_metric']}; "
        f"flows per tier (all workers' status): {summary['flows_per_tier_all_workers']}",
    ]
    for key in ("config_divergences", "sampler_errors", "log_errors", "restarts_missing"):
        if summary[key]:
            lines.append(f"{key}: {json.dumps(summary[key][:5])}")
    v = summary["verdict"]
    judged = ", ".join(v["rss_judged"]) or "none (steady part shorter than 5 min)"
    lines += [
        "",
        f"verdict: {'FLAT' if v['flat'] else 'NOT FLAT'} (RSS slope < {v['rss_limit_kib_min']:g} "
        f"KiB/min after warm-up for processes watched >= {v['min_span_s']:g} s: {judged}; "
        f"fds at the final idle point <= the first + {v['fd_tolerance']})",
        f"errors: {summary['errors_unexpected']} unexpected, {summary['errors_expected']} "
        "expected (cut by a worker kill)",
    ]
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


# --- main -------------------------------------------------------------------------------------


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--warmup", type=float, help="seconds left out of the slopes (60)")
    p.add_argument("--sample-every", type=float, help="seconds between samples (5)")
    p.add_argument("--reload-every", type=float, help="seconds between reloads (30)")
    p.add_argument("--kill-every", type=float, help="seconds between worker kills (150; 0: none)")
    p.add_argument(
        "--kill",
        choices=("other", "alternate"),
        default="other",
        help="which worker: the one without admin/UDP (other), or each in turn",
    )
    p.add_argument("--wrk-run", type=float, help="seconds per wrk run (10)")
    p.add_argument("--bulk-size", type=int, default=8 << 20, help="bytes per bulk transfer")
    p.add_argument(
        "--rss-limit",
        type=float,
        default=RSS_LIMIT_KIB_PER_MIN,
        help="KiB/min of RSS growth that is still flat (1024)",
    )
    p.add_argument(
        "--gateway-src",
        type=Path,
        metavar="DIR",
        help="run the gateway and l4gw_plugins packages in DIR (as bench/run.py)",
    )
    p.add_argument("--quick", action="store_true", help="the smoke run: --duration 20")
    p.add_argument("--json", metavar="FILE", help="write the series, events and summary")
    p.add_argument("--csv", metavar="FILE", help="write the series")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 20.0
    d = args.duration
    if d < 10:
        p.error("--duration: at least 10 s")
    # Shorter runs scale the schedule down, so a smoke run still sees every event.
    defaults = {
        "warmup": min(60.0, d / 4),
        "sample_every": min(5.0, max(1.0, d / 20)),
        "reload_every": min(30.0, d / 4),
        "kill_every": min(150.0, d / 2),
        "wrk_run": min(10.0, max(1.0, d / 8)),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing_tools(("wrk", "nginx"), "soak"):
        return 2
    interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-soak-"))
    soak = Soak(args, workdir)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()[0]
    try:
        soak.start()
        _log(
            f"gateway up: supervisor {soak.supervisor}, workers {soak.workers()}; "
            f"{args.duration:g} s of load"
        )
        soak.run()
        soak.stop_gateway()
        summary = soak.summary()
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        soak.gate.stop()
        soak.children.stop_all()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary["started"] = started
    summary["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(report_text(summary, args))
    settings = {
        k: getattr(args, k)
        for k in (
            "duration",
            "warmup",
            "sample_every",
            "reload_every",
            "kill_every",
            "kill",
            "wrk_run",
            "bulk_size",
            "rss_limit",
        )
    }
    doc = {
        "settings": settings,
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
        "summary": summary,
        "series": soak.rows,
        "idle_points": soak.idle,
        "reloads": [
            {"t": round(r.at, 1), "variant": r.variant, "confirmed": r.confirmed}
            for r in soak.reloads
        ],
    }
    write_report(args.json, doc)
    if args.csv:
        write_csv(soak.rows, Path(args.csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
