#!/usr/bin/env python3
"""What one connection costs a proxy: CPU, syscalls, and memory while idle.

Measured in units that do not depend on how busy the machine is, so that a
code change can be judged on a shared 2-vCPU VM:

* ``cpu``: CPU µs (utime+stime from ``/proc/PID/stat``) per new connection over a
  fixed count of short connections (an HTTP request with ``Connection: close`` to
  nginx, through the proxy), fresh proxy processes every round, rounds
  interleaved over the paths, medians.
* ``syscalls``: ``strace -c -f -p PID`` on the proxy over the same fixed-count
  load: syscalls per connection, by name.
* ``instructions``: user-space instructions per connection, counted by valgrind's
  callgrind (``callgrind_control -i on`` after the warm-up, a dump after the fixed-count
  load): no timing in it, so it repeats to 0.1 % on a noisy VM where CPU time moves
  10–40 % between processes, and a change of a few Python calls per connection shows
  (a call is ~1,000 instructions). What the process does per second with no load
  (timers, the relay's status file) is counted first, over ``--idle-seconds``, and
  subtracted: valgrind stretches a load ~50-fold, and would pass that work off as
  thousands of instructions per connection. It leaves out the kernel's part and cache
  effects: a code change is judged here, the gateway against HAProxy by ``cpu`` and run.py.
* ``--requests N`` (cpu, syscalls, instructions): N requests per connection, all but
  the last kept alive, and the results per request: what a request costs the copy
  tier once the connection is up (``gateway-copy``; the default gateway hands a
  kept-alive flow to its kernel tier only after 100 ms, which these connections do
  not last).
* ``idle``: RSS per idle connection: ``--hold`` connections opened through the
  proxy to an echo backend, one 16-byte exchange each (with ``--promote S``, two more
  S seconds apart, which hand each connection to the gateway's kernel tier),
  then held; (RSS with them − RSS before) / count, and the proxy's CPU over
  ``--idle-seconds`` while it holds them. At the end every held connection exchanges a unique
  payload once more and it must come back byte-exact. The default is 9,900, not
  10,000: the hard ``RLIMIT_NOFILE`` here is 20,000 and one proxy process holds
  two descriptors per connection plus its own.

    .venv/bin/python bench/conn_cost.py cpu --connections 5000 --rounds 5
    .venv/bin/python bench/conn_cost.py syscalls --connections 3000
    .venv/bin/python bench/conn_cost.py instructions --paths trio-lean,gateway-copy,gateway --connections 2000
    .venv/bin/python bench/conn_cost.py idle --hold 9900
    .venv/bin/python bench/conn_cost.py idle --paths gateway --hold 3000 --promote 0.3
    .venv/bin/python bench/conn_cost.py cpu --paths gateway-copy --gateway-src ref=/tmp/ref
    .venv/bin/python bench/conn_cost.py cpu --gateway-src pyenv=/tmp/venv-pyenv/bin/python
    .venv/bin/python bench/conn_cost.py cpu --quick               # smoke: tiny counts

Paths: ``gateway`` (``l4gw run``, installed plugins at their defaults),
``gateway-copy`` (``disable_plugins = ["relay"]``), ``haproxy`` (``nbthread 1``),
``uvloop`` (bench/uvloop_proxy.py), ``trio-lean`` and ``trio-naive`` (bench/trio_proxy.py:
the gateway's connection machinery without l4gw's layers, and a textbook trio proxy; not
in the default set), and ``gw-LABEL`` for ``--gateway-src LABEL=DIR`` (a copy of a tree)
or ``LABEL=PYTHON`` (this tree run by another interpreter). Every child is stopped on exit;
every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (
    LOOPBACK,
    REFERENCE_PROXIES,
    THIS_TREE,
    Child,
    Children,
    GatewaySource,
    fd_count,
    free_port,
    gateway_sources,
    rss_kib,
    start_gateway,
    start_haproxy,
    start_nginx,
    start_reference_proxy,
)

from gateway.relay.policy import DEFAULT_STATUS_DIR

PATHS = ("gateway", "gateway-copy", "haproxy", "uvloop")
_COPY_ONLY = 'disable_plugins = ["relay"]\n'
_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
_KEEPALIVE_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


# --- children: the fixed-count client and the echo backend ------------------------


def client(port: int, count: int, concurrency: int, requests: int = 1) -> None:
    """``count`` short HTTP connections to ``port``, ``concurrency`` at a time, each with
    ``requests`` requests (all but the last kept alive); exit 1 if any failed (run as a
    child process, so its CPU is not the bench's)."""
    lock = threading.Lock()
    left = [count]
    failed: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0 or failed:
                    return
                left[0] -= 1
            try:
                with socket.create_connection((LOOPBACK, port), timeout=10) as s:
                    for _ in range(requests - 1):
                        s.sendall(_KEEPALIVE_REQUEST)
                        _read_response(s)
                    s.sendall(_REQUEST)
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
                if not reply.startswith(b"HTTP/1.1 200"):
                    raise OSError(f"bad reply {reply[:40]!r}")
            except OSError as exc:
                with lock:
                    failed.append(repr(exc))
                return

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"client: {len(failed)} failed, first: {failed[0]}", file=sys.stderr)
        sys.exit(1)


def echo_server(port: int) -> None:
    """Echo every byte back; one thread and a selector for any number of connections."""
    sel = selectors.DefaultSelector()
    lsn = socket.create_server((LOOPBACK, port), backlog=4096)
    lsn.setblocking(False)
    sel.register(lsn, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is lsn:
                try:
                    conn, _ = lsn.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            sock.setblocking(True)  # small echoes: never more than the send buffer
            sock.sendall(data)
            sock.setblocking(False)


# --- paths ------------------------------------------------------------------------


def start_path(
    children: Children,
    name: str,
    listen: int,
    backend: int,
    sources: dict[str, GatewaySource],
    maxconn: int = 8000,
    variants: dict[str, str] | None = None,
) -> list[Child]:
    """Start one proxy on ``listen`` forwarding to ``backend``; its processes."""
    routes = {"bench": (listen, backend)}
    variants = variants or {}
    if name == "gateway":
        return [start_gateway(children, name, routes)]
    if name == "gateway-copy":
        return [start_gateway(children, name, routes, _COPY_ONLY)]
    if name in variants:
        label, _, source = name.partition("@")
        src = sources[f"gw-{source}"] if source else THIS_TREE
        return [start_gateway(children, label, routes, variants[name], src=src)]
    if name in sources:
        return [
            start_gateway(
                children, name, routes, _COPY_ONLY if "copy" in name else "", src=sources[name]
            )
        ]
    if name == "haproxy":
        return [start_haproxy(children, name, routes, 1, maxconn=maxconn)]
    if name in REFERENCE_PROXIES:
        return [start_reference_proxy(children, name, routes)]
    raise ValueError(name)


def _cpu(procs: list[Child]) -> tuple[float, float]:
    """(user, kernel) CPU seconds of ``procs`` so far."""
    times = [p.cpu_times() for p in procs]
    return sum(u for u, _ in times), sum(k for _, k in times)


def _minor_faults(procs: list[Child]) -> int:
    """Minor page faults of ``procs`` so far (field 10 of proc(5)): kernel time that no
    syscall count shows (memory the allocator hands back and touches again)."""
    total = 0
    for p in procs:
        try:
            total += int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
        except OSError:
            pass
    return total


def _read_response(s: socket.socket) -> None:
    """One kept-alive HTTP response: its head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed before the response's head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = _CONTENT_LENGTH.search(head)
    if not head.startswith(b"HTTP/1.1 200") or m is None:
        raise OSError(f"bad reply {head[:40]!r}")
    left = int(m.group(1)) - len(body)
    while left > 0:
        chunk = s.recv(min(left, 65536))
        if not chunk:
            raise OSError("closed in the response's body")
        left -= len(chunk)


def _run_client(port: int, count: int, args: argparse.Namespace) -> None:
    argv = [sys.executable, __file__, "--client", str(port), str(count), str(args.concurrency)]
    subprocess.run([*argv, str(args.requests)], check=True, timeout=120)


def _units(args: argparse.Namespace) -> tuple[int, str]:
    """What a measurement is divided by, and its name: connections, or requests."""
    if args.requests == 1:
        return args.connections, "connection"
    return args.connections * args.requests, f"request ({args.requests} per connection)"


def measure_cpu(
    args: argparse.Namespace, backend: int, workdir: Path
) -> dict[str, dict[str, list[float]]]:
    """CPU µs per connection (total, user, kernel), one fresh process per path and round.

    The split tells what a change can win: the kernel part (the syscalls, and on
    loopback the peers' TCP work done inline in them) is much the same for every proxy
    that makes the same calls; the user part is the proxy's own code."""
    samples: dict[str, dict[str, list[float]]] = {
        p: {"total": [], "user": [], "kernel": [], "faults": []} for p in args.paths
    }
    for r in range(args.rounds):
        shift = r % len(args.paths)
        for name in args.paths[shift:] + args.paths[:shift]:
            children = Children(workdir)
            try:
                listen = free_port()
                procs = start_path(
                    children, name, listen, backend, args.sources, variants=args.variants
                )
                _run_client(listen, args.warmup, args)
                user0, kernel0 = _cpu(procs)
                faults0 = _minor_faults(procs)
                _run_client(listen, args.connections, args)
                user1, kernel1 = _cpu(procs)
                faults = (_minor_faults(procs) - faults0) / _units(args)[0]
                for p in procs:
                    p.check_alive()
            finally:
                children.stop_all()
            per = 1e6 / _units(args)[0]
            user, kernel = (user1 - user0) * per, (kernel1 - kernel0) * per
            got = samples[name]
            got["total"].append(user + kernel)
            got["user"].append(user)
            got["kernel"].append(kernel)
            got["faults"].append(faults)
            _log(
                f"round {r + 1} {name}: {user + kernel:.1f} µs/{_units(args)[1].split()[0]} "
                f"(user {user:.1f}, kernel {kernel:.1f}, {faults:.2f} page faults)"
            )
    return samples


def measure_syscalls(
    args: argparse.Namespace, backend: int, workdir: Path
) -> dict[str, dict[str, float]]:
    """Syscalls per connection by name (strace -c -f) for each path."""
    out: dict[str, dict[str, float]] = {}
    for name in args.paths:
        children = Children(workdir)
        try:
            listen = free_port()
            procs = start_path(
                children, name, listen, backend, args.sources, variants=args.variants
            )
            _run_client(listen, args.warmup, args)
            summary = workdir / f"strace-{name}.txt"
            strace = subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(summary), "-p", str(procs[0].pid)],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)  # attached
            _run_client(listen, args.connections, args)
            time.sleep(0.2)
            strace.terminate()
            strace.wait(10)
        finally:
            children.stop_all()
        counts: dict[str, float] = {}
        for line in summary.read_text().splitlines():
            m = _STRACE_LINE.match(line)
            if m and m.group(2) != "total":
                counts[m.group(2)] = int(m.group(1)) / _units(args)[0]
        out[name] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        total = sum(counts.values())
        _log(
            f"{name}: {total:.1f} syscalls/conn: "
            + ", ".join(f"{k} {v:.2f}" for k, v in out[name].items() if v >= 0.05)
        )
    return out


_CALLGRIND_TOTAL = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)


def measure_instructions(
    args: argparse.Namespace, backend: int, workdir: Path
) -> dict[str, dict[str, float]]:
    """User-space instructions per connection (valgrind callgrind) for each path."""
    out: dict[str, dict[str, float]] = {}
    for name in args.paths:
        dump = workdir / f"{name}.callgrind"
        wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={dump}"]  # fmt: skip
        children = Children(workdir, wrapper)
        counts: list[float] = []
        try:
            listen = free_port()
            proc = start_path(
                children, name, listen, backend, args.sources, variants=args.variants
            )[0]
            _run_client(listen, args.warmup, args)
            _callgrind_control(proc.pid, "--instr=on")
            # What the process does per second with no load (timers, the relay's
            # status file): under valgrind a load lasts 50x longer, so this work
            # would pass for thousands of instructions per connection.
            began = time.monotonic()
            time.sleep(args.idle_seconds)
            background = _dumped(proc.pid, dump, 1) / (time.monotonic() - began)
            for r in range(args.rounds):
                began = time.monotonic()
                _run_client(listen, args.connections, args)
                took = time.monotonic() - began
                total = _dumped(proc.pid, dump, r + 2)
                counts.append((total - background * took) / _units(args)[0])
            proc.check_alive()
        finally:
            children.stop_all(timeout=30)
        out[name] = {
            "median": statistics.median(counts),
            "samples": counts,
            "background_per_second": background,
        }
        _log(
            f"{name}: {out[name]['median']:,.0f} instructions per {_units(args)[1]} ({counts}), "
            f"background {background:,.0f}/s subtracted"
        )
    return out


def _dumped(pid: int, dump: Path, part: int) -> int:
    """Instructions counted since the last dump (a dump zeroes the counters)."""
    _callgrind_control(pid, "--dump")
    text = Path(f"{dump}.{part}").read_text(errors="replace")
    m = _CALLGRIND_TOTAL.search(text)
    if m is None:
        raise RuntimeError(f"no total in callgrind dump {dump}.{part}")
    return int(m.group(1))


def _callgrind_control(pid: int, option: str) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=60
    )


def measure_idle(args: argparse.Namespace, echo: int, workdir: Path) -> dict[str, dict[str, float]]:
    """RSS per held idle connection, and a byte-exact exchange on each at the end."""
    out: dict[str, dict[str, float]] = {}
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for name in args.paths:
        children = Children(workdir)
        socks: list[socket.socket] = []
        try:
            listen = free_port()
            procs = start_path(
                children, name, listen, echo, args.sources, args.hold + 50, args.variants
            )
            _exchange_new(listen, 200)  # warm-up: first-use allocations are not per connection
            time.sleep(0.5)
            rss0 = sum(rss_kib(p.pid) or 0 for p in procs)
            fds0 = sum(fd_count(p.pid) or 0 for p in procs)
            for i in range(args.hold):
                s = socket.create_connection((LOOPBACK, listen), timeout=10)
                socks.append(s)
                s.sendall(b"%016d" % i)
            for i, s in enumerate(socks):
                _expect(s, b"%016d" % i)
            for later in range(2 if args.promote else 0):
                # Bytes that move once a flow is older than the relay plugin's
                # promote_after promote it; it first watches the flow's rate over its
                # next bytes (bulk or not), which the second exchange ends: then the
                # flow is in a kernel tier, where it is held.
                time.sleep(args.promote)
                for i, s in enumerate(socks):
                    s.sendall(b"later%d-%09d" % (later, i))
                for i, s in enumerate(socks):
                    _expect(s, b"later%d-%09d" % (later, i))
            time.sleep(1.0)
            if args.promote:
                # Once every flow is in its tier and its watchdog has had a sweep period
                # (2 s) to settle: arming thousands of flows takes seconds of CPU and
                # what is on its way, which is not what holding them costs.
                _wait_steady(procs)
            rss1 = sum(rss_kib(p.pid) or 0 for p in procs)
            fds1 = sum(fd_count(p.pid) or 0 for p in procs)
            # What holding them costs the proxy while nothing moves (a kernel tier's
            # watchdog, timers), over --idle-seconds.
            cpu0, t0 = sum(_cpu(procs)), time.monotonic()
            time.sleep(args.idle_seconds)
            held_cpu_pct = 100 * (sum(_cpu(procs)) - cpu0) / (time.monotonic() - t0)
            # After that wait: the status file is rewritten once a second.
            kernel_flows = sum(_kernel_tier_flows(p.pid) for p in procs)
            for i, s in enumerate(socks):
                s.sendall(b"again-%010d" % i)
            bad = 0
            for i, s in enumerate(socks):
                try:
                    _expect(s, b"again-%010d" % i)
                except OSError:
                    bad += 1
            for p in procs:
                p.check_alive()
        finally:
            for s in socks:
                s.close()
            children.stop_all()
        per = 1024 * (rss1 - rss0) / args.hold
        out[name] = {
            "rss_before_kib": rss0,
            "rss_held_kib": rss1,
            "bytes_per_conn": per,
            "fds_per_conn": (fds1 - fds0) / args.hold,
            "held_cpu_pct": held_cpu_pct,
            "kernel_tier_flows": kernel_flows,
            "failed": bad,
        }
        _log(
            f"{name}: RSS {rss0} -> {rss1} KiB over {args.hold}: {per:.0f} B/conn, "
            f"{(fds1 - fds0) / args.hold:.2f} descriptors/conn; "
            f"{kernel_flows} in a kernel tier; {held_cpu_pct:.1f} % of a core while held; "
            f"{bad} failed"
        )
    return out


def _wait_steady(procs: list[Child], settle: float = 3.0, at_most: float = 30.0) -> None:
    """Until the flows the gateways hold in kernel tiers stop changing (their status
    files are rewritten once a second), then ``settle`` seconds more."""
    deadline, last = time.monotonic() + at_most, -1
    while time.monotonic() < deadline:
        now = sum(_kernel_tier_flows(p.pid) for p in procs)
        if now == last:
            break
        last = now
        time.sleep(1.1)
    time.sleep(settle)


def _kernel_tier_flows(pid: int) -> int:
    """Flows a gateway process has in its kernel tiers now (its relay status file in
    the default ``status_dir``); 0 for another proxy."""
    try:
        tiers = json.loads((Path(DEFAULT_STATUS_DIR) / f"{pid}.json").read_text())["tiers"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(int(tiers[t].get("flows_now", 0)) for t in ("sockmap", "splice") if t in tiers)


def _exchange_new(port: int, count: int) -> None:
    for i in range(count):
        with socket.create_connection((LOOPBACK, port), timeout=10) as s:
            s.sendall(b"warm-%011d" % i)
            _expect(s, b"warm-%011d" % i)


def _expect(s: socket.socket, want: bytes) -> None:
    got = b""
    while len(got) < len(want):
        chunk = s.recv(len(want) - len(got))
        if not chunk:
            break
        got += chunk
    if got != want:
        raise OSError(f"echo differs: {got!r} != {want!r}")


# --- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("cpu", "syscalls", "instructions", "idle"))
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated (%(default)s)")
    p.add_argument(
        "--gateway-src",
        action="append",
        default=[],
        metavar="LABEL=DIR|PYTHON",
        help="a gateway path gw-LABEL: another tree's l4gw (DIR, a copy with gateway and "
        "l4gw_plugins), or this tree run by another interpreter (PYTHON); repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=TOML",
        help="a gateway path gw-LABEL with TOML lines added to [gateway] "
        "(e.g. 'nop=disable_plugins = [\"geo_deny\"]'); LABEL@SRC runs the tree of "
        "--gateway-src SRC=DIR with them",
    )
    p.add_argument("--connections", type=int, default=3000, help="per measurement (3000)")
    p.add_argument("--warmup", type=int, default=300, help="connections before measuring (300)")
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=5.0,
        help="instructions: seconds without load to measure the background rate; "
        "idle: seconds the proxy's CPU is measured while it holds the connections (5)",
    )
    p.add_argument(
        "--promote",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="idle: two more exchanges this far apart, which hand each connection to "
        "the gateway's kernel tier before it is held (0: none)",
    )
    p.add_argument("--concurrency", type=int, default=16, help="client threads (16)")
    p.add_argument(
        "--requests",
        type=int,
        default=1,
        help="cpu, syscalls, instructions: HTTP requests per connection, all but the last "
        "kept alive; above 1, results are per request (1: per new connection)",
    )
    p.add_argument(
        "--rounds", type=int, help="cpu: interleaved rounds; instructions: loads (3; 1 quick)"
    )
    p.add_argument("--hold", type=int, default=9900, help="idle: connections held (9900)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts, 1 round")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, dumps)")
    args = p.parse_args(argv)
    if args.quick:
        args.connections, args.warmup, args.hold, args.idle_seconds = 200, 20, 300, 1.0
        if args.what == "cpu":
            # The kernel counts a process's CPU in 10 ms ticks: 200 connections of
            # HAProxy's ~50 µs are about one, and could read as none.
            args.connections = 1000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    args.paths = [x for x in args.paths.split(",") if x]
    args.variants = {}
    for item in args.variant:
        label, _, extra = item.partition("=")
        args.variants[f"gw-{label}"] = extra.replace("\\n", "\n")
        if f"gw-{label}" not in args.paths:
            args.paths.append(f"gw-{label}")
    try:
        args.sources = gateway_sources(args.gateway_src)
    except ValueError as exc:
        p.error(str(exc))
    # A source or variant named in --paths too runs once a round, not twice.
    args.paths += [name for name in args.sources if name not in args.paths]
    if args.what == "syscalls" and not _which("strace"):
        p.error("strace not found")
    if args.what == "instructions" and not _which("callgrind_control"):
        p.error("valgrind not found (apt install valgrind)")
    if args.what == "idle" and args.hold > 9900:
        p.error("--hold: at most 9900 (RLIMIT_NOFILE 20000; the proxy needs 2 fds per connection)")

    workdir = Path(tempfile.mkdtemp(prefix="l4gw-conncost-"))
    backends = Children(workdir)
    try:
        port = free_port()
        if args.what == "idle":
            child = backends.start("echo", [sys.executable, __file__, "--echo-server", str(port)])
            child.wait_listening([port])
            result: object = measure_idle(args, port, workdir)
        else:
            start_nginx(backends, port)
            if args.what == "cpu":
                samples = measure_cpu(args, port, workdir)
                result = {
                    k: {
                        "median": statistics.median(v["total"]),
                        "user": statistics.median(v["user"]),
                        "kernel": statistics.median(v["kernel"]),
                        "faults": statistics.median(v["faults"]),
                        "samples": v["total"],
                    }
                    for k, v in samples.items()
                }
                per = _units(args)[1]
                print(
                    f"| path | CPU µs per {per} (median) | user | kernel "
                    f"| minor page faults per {per} | samples |"
                )
                print("|---|---|---|---|---|---|")
                for k, v in samples.items():
                    med = result[k]
                    print(
                        f"| {k} | {med['median']:.1f} | {med['user']:.1f} | {med['kernel']:.1f} "
                        f"| {med['faults']:.2f} "
                        f"| {', '.join(f'{x:.1f}' for x in v['total'])} |"
                    )
            elif args.what == "instructions":
                result = measure_instructions(args, port, workdir)
                print(
                    f"| path | instructions per {_units(args)[1]} (user space, median) | samples "
                    "| background per second (subtracted) |"
                )
                print("|---|---|---|---|")
                for k, v in result.items():
                    samples = ", ".join(f"{x:,.0f}" for x in v["samples"])
                    print(
                        f"| {k} | {v['median']:,.0f} | {samples} "
                        f"| {v['background_per_second']:,.0f} |"
                    )
            else:
                calls = measure_syscalls(args, port, workdir)
                result = calls
                for path, counts in calls.items():
                    total = sum(counts.values())
                    top = ", ".join(f"{n} {c:.2f}" for n, c in counts.items() if c >= 0.05)
                    print(f"| {path} | {total:.1f} | {top} |")
    finally:
        backends.stop_all()
        if args.keep:
            _log(f"kept {workdir} (logs, configs, callgrind dumps)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"what": args.what, "result": result}, indent=1))
    return 0


def _which(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ["PATH"].split(":"))


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-server":
        echo_server(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
