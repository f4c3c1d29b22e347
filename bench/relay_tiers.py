#!/usr/bin/env python3
"""Benchmark the relay tiers: copy vs splice vs sockmap vs direct vs HAProxy.

One run starts the backends (an iperf3 server, an nginx returning a small 200,
a 64-byte echo server) and one proxy per path: three ``l4gw run`` processes,
each with ``[plugin.relay]`` set to one tier and promotion at once (so the
whole measurement is in that tier), one with the default policy, and
``haproxy -db`` in mode tcp with one thread. It then runs every load against
every path in interleaved rounds (round r rotates the path order by r, so
drift of the machine spreads over all paths) and prints the medians, each
path's ratio to direct and to HAProxy, and whether the targets hold:

* bulk (iperf3, 1 and 4 streams): the best tier ≥ 0.9 × direct;
* keepalive request/response (wrk → proxy → nginx): the best tier's req/s
  above HAProxy's.

    .venv/bin/python bench/relay_tiers.py                 # ~4 min
    .venv/bin/python bench/relay_tiers.py --quick         # smoke: 1 s, 1 round
    .venv/bin/python bench/relay_tiers.py --only pingpong --paths direct,splice

Loopback only, every measurement bounded (its duration plus a hard timeout),
every child stopped on exit. The sockmap path needs root; without it that
gateway falls back (its status says so and the table marks it). Reuses the
process and load helpers of bench/peers.py and bench/loads.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, Load, LoadFailed, Metric, Metrics, run_load
from peers import (
    LOOPBACK,
    Child,
    Children,
    free_port,
    machine_busy_seconds,
    start_gateway,
    start_haproxy,
    start_iperf3_server,
    start_nginx,
    start_reference_proxy,
)

TIER_PATHS = {
    "copy": '["copy"]',
    "splice": '["splice", "copy"]',
    "sockmap": '["sockmap", "copy"]',
}
PATHS = ("direct", "copy", "splice", "sockmap", "default", "haproxy", "uvloop", "haproxy-splice")
DEFAULT_PATHS = ("direct", "copy", "splice", "sockmap", "haproxy", "uvloop")
PATH_NOTES = {
    "direct": "client -> backend",
    "copy": 'l4gw, [plugin.relay] tiers = ["copy"] (the core\'s trio relay)',
    "splice": 'l4gw, tiers = ["splice", "copy"], promotion at once',
    "sockmap": 'l4gw, tiers = ["sockmap", "copy"], promotion at once',
    "default": "l4gw with the default [plugin.relay] policy",
    "haproxy": "haproxy mode tcp, nbthread 1",
    "haproxy-splice": "haproxy mode tcp, nbthread 1, option splice-auto (its splice(2) tier)",
    "uvloop": "bench/uvloop_proxy.py: a lean asyncio+uvloop proxy, the floor for Python",
}
PINGPONG_SIZE = 64
DEFAULT_LOADS = ("iperf-1", "iperf-4", "wrk-keepalive", "pingpong")
TOOLS = ("iperf3", "wrk", "nginx", "haproxy")


# --- the 64-byte ping-pong load ---------------------------------------------------


def echo_server(port: int) -> None:
    """Echo every byte back, one thread per connection (run as a child process)."""
    lsn = socket.create_server((LOOPBACK, port), backlog=128)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = lsn.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def pingpong(port: int, seconds: float) -> Metrics:
    """64-byte request, 64-byte echo, one at a time, for ``seconds``: RTT percentiles."""
    msg = bytes(range(PINGPONG_SIZE))
    rtts: list[float] = []
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Warm the path (and let a promotion happen) before timing.
        for _ in range(200):
            s.sendall(msg)
            _recv_exact(s, PINGPONG_SIZE)
        end = time.perf_counter() + seconds
        while (t0 := time.perf_counter()) < end:
            s.sendall(msg)
            if _recv_exact(s, PINGPONG_SIZE) != msg:
                raise LoadFailed("pingpong: echo differs")
            rtts.append(time.perf_counter() - t0)
    rtts.sort()
    return {
        "p50_us": 1e6 * rtts[len(rtts) // 2],
        "p99_us": 1e6 * rtts[int(len(rtts) * 0.99)],
        "requests": float(len(rtts)),
    }


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise LoadFailed("pingpong: EOF")
        buf += chunk
    return bytes(buf)


PINGPONG = Load(
    "pingpong",
    "echo",
    f"{PINGPONG_SIZE}-byte ping-pong on one connection (Python client, echo server)",
    (Metric("p50_us", "p50 µs", False), Metric("p99_us", "p99 µs", False)),
    lambda port, seconds: [],
    lambda text: {},
)
ALL_LOADS = {**{k: LOADS[k] for k in ("iperf-1", "iperf-4", "wrk-keepalive")}, "pingpong": PINGPONG}


# --- paths -----------------------------------------------------------------------


@dataclass
class Path_:
    name: str
    ports: dict[str, int]
    procs: list[Child] = field(default_factory=list)
    status_dir: Path | None = None
    start: Callable[[], list[Child]] | None = None
    """Starts the proxy processes (none for direct): each round starts new ones."""

    def restart(self, children: Children) -> None:
        """Stop the processes and start new ones on the same ports."""
        if self.start is None:
            return
        for p in self.procs:
            children.stop(p)
        self.procs = self.start()
        if self.status_dir is not None:
            _wait_status(self)

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)

    def check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()

    def relay_status(self) -> dict[str, Any] | None:
        if self.status_dir is None:
            return None
        for f in self.status_dir.glob("*.json"):
            try:
                data: dict[str, Any] = json.loads(f.read_text())
                return data
            except (OSError, ValueError):
                return None
        return None


POLICIES: dict[str, str] = {}
"""``--policy LABEL=TOML``: path ``policy-LABEL`` runs l4gw with these [plugin.relay] lines."""


def _relay_extra(path: str, status_dir: Path) -> str:
    # start_gateway puts ``extra`` at the end of the [gateway] table; a new table
    # header there is valid TOML and keeps bench/peers.py untouched.
    lines = [f'\n[plugin.relay]\nstatus_dir = "{status_dir}"']
    if path in TIER_PATHS:
        lines.append(f"tiers = {TIER_PATHS[path]}\npromote_after_bytes = 0")
    if path in POLICIES:
        lines.append(POLICIES[path])
    return "\n".join(lines) + "\n"


def start_paths(children: Children, names: list[str], backends: set[str]) -> list[Path_]:
    targets: dict[str, int] = {}
    if "iperf" in backends:
        targets["iperf"] = free_port()
        start_iperf3_server(children, targets["iperf"])
    if "http" in backends:
        targets["http"] = free_port()
        start_nginx(children, targets["http"])
    if "echo" in backends:
        targets["echo"] = free_port()
        child = children.start(
            "echo", [sys.executable, str(Path(__file__).resolve()), "--echo-server",
                     str(targets["echo"])]
        )  # fmt: skip
        child.wait_listening([targets["echo"]])
    paths: list[Path_] = []
    for name in names:
        if name == "direct":
            paths.append(Path_(name, dict(targets)))
            continue
        routes = {kind: (free_port(), port) for kind, port in targets.items()}
        ports = {kind: listen for kind, (listen, _) in routes.items()}
        status_dir = None if name in _NOT_L4GW else children.workdir / f"status-{name}"
        start = _starter(children, name, routes, status_dir)
        path = Path_(name, ports, start(), status_dir, start)
        paths.append(path)
        if status_dir is not None:
            _wait_status(path)
    return paths


_NOT_L4GW = ("haproxy", "haproxy-splice", "uvloop")


def _starter(
    children: Children, name: str, routes: dict[str, tuple[int, int]], status_dir: Path | None
) -> Callable[[], list[Child]]:
    """What starts path ``name``'s proxy (again, every round)."""

    def start() -> list[Child]:
        if name == "uvloop":
            return [start_reference_proxy(children, name, routes)]
        if status_dir is None:
            return [start_haproxy(children, name, routes, 1, splice=name == "haproxy-splice")]
        return [start_gateway(children, name, routes, _relay_extra(name, status_dir))]

    return start


def _wait_status(path: Path_, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while path.relay_status() is None:
        path.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no relay status in {path.status_dir}")
        time.sleep(0.05)
    status = path.relay_status() or {}
    if path.name in ("splice", "sockmap") and not status["tiers"][path.name]["enabled"]:
        why = status["tiers"][path.name]["why_not"]
        _log(f"WARNING: {path.name} tier not enabled ({why}): that path measures its fallback")


# --- running -----------------------------------------------------------------------


def measure(load: Load, path: Path_, seconds: float) -> Metrics:
    path.check_alive()
    busy0 = machine_busy_seconds()
    cpu0, t0 = path.cpu_seconds(), time.monotonic()
    port = path.ports[load.backend]
    metrics = pingpong(port, seconds) if load is PINGPONG else _run_load(load, port, seconds)
    cpu1, t1 = path.cpu_seconds(), time.monotonic()
    busy1 = machine_busy_seconds()
    path.check_alive()
    if path.procs:
        metrics["proxy_cpu_pct"] = 100 * (cpu1 - cpu0) / (t1 - t0)
    metrics["host_cpu_pct"] = 100 * (busy1 - busy0) / (t1 - t0)
    return metrics


def _run_load(load: Load, port: int, seconds: float) -> Metrics:
    # iperf3's server runs one test at a time and frees itself only once the previous
    # test's connections are closed, which through a proxy can take a moment.
    for _ in range(20):
        try:
            return run_load(load, port, seconds)
        except LoadFailed as exc:
            if "server is busy" not in str(exc):
                raise
            time.sleep(0.5)
    return run_load(load, port, seconds)


Samples = dict[str, dict[str, list[Metrics]]]


def rounds(
    loads: list[Load], paths: list[Path_], args: argparse.Namespace, children: Children
) -> Samples:
    samples: Samples = {load.name: {p.name: [] for p in paths} for load in loads}
    for r in range(args.rounds):
        if r > 0 and not args.same_processes:
            # New processes every round: a CPython process keeps its speed for life
            # (bench/README.md, "One process per path"); the median averages it out.
            for path in paths:
                path.restart(children)
                if args.warmup > 0:
                    for load in loads:
                        measure(load, path, args.warmup)
        for load in loads:
            shift = r % len(paths)
            for path in paths[shift:] + paths[:shift]:
                m = measure(load, path, args.duration)
                samples[load.name][path.name].append(m)
                keys = [x.key for x in load.metrics] + ["proxy_cpu_pct", "host_cpu_pct"]
                shown = ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)
                _log(f"round {r + 1}/{args.rounds} {load.name:14} {path.name:8} {shown}")
    return samples


def report(loads: list[Load], paths: list[Path_], samples: Samples) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in loads:
        per: dict[str, Any] = {}
        for path in paths:
            runs = samples[load.name][path.name]
            keys = sorted({k for run in runs for k in run})
            per[path.name] = {
                "median": {k: statistics.median(r[k] for r in runs if k in r) for k in keys},
                "min": {k: min(r[k] for r in runs if k in r) for k in keys},
                "max": {k: max(r[k] for r in runs if k in r) for k in keys},
            }
        out[load.name] = {"description": load.description, "paths": per}
    return out


def targets(results: dict[str, Any], tiers: list[str]) -> list[str]:
    """The two targets, evaluated on the best tier of each load."""
    lines: list[str] = []

    def best(load: str, key: str) -> tuple[str, float] | None:
        cells = results.get(load, {}).get("paths", {})
        got = [(t, cells[t]["median"][key]) for t in tiers if t in cells]
        return max(got, key=lambda x: x[1]) if got else None

    for load in ("iperf-1", "iperf-4"):
        b = best(load, "gbit_s")
        direct = results.get(load, {}).get("paths", {}).get("direct")
        if b and direct:
            ratio = b[1] / direct["median"]["gbit_s"]
            verdict = "met" if ratio >= 0.9 else "NOT met"
            lines.append(
                f"{load}: best tier {b[0]} = {ratio:.2f} x direct (target >= 0.9): {verdict}"
            )
    b = best("wrk-keepalive", "rps")
    ha = results.get("wrk-keepalive", {}).get("paths", {}).get("haproxy")
    if b and ha:
        ratio = b[1] / ha["median"]["rps"]
        verdict = "met" if ratio > 1 else "NOT met"
        lines.append(
            f"wrk-keepalive: best tier {b[0]} = {ratio:.2f} x HAProxy req/s (target > 1): {verdict}"
        )
    return lines


def table(results: dict[str, Any], loads: list[Load]) -> str:
    rows = [
        "| load | metric | path | median | min-max | ÷direct | ÷haproxy | proxy CPU % | host CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load in loads:
        cells = results[load.name]["paths"]
        for metric in load.metrics:
            for path, cell in cells.items():
                med = cell["median"].get(metric.key)
                if med is None:
                    continue
                lo, hi = cell["min"][metric.key], cell["max"][metric.key]
                d = cells.get("direct", {}).get("median", {}).get(metric.key)
                h = cells.get("haproxy", {}).get("median", {}).get(metric.key)
                cpu = cell["median"].get("proxy_cpu_pct")
                host = cell["median"].get("host_cpu_pct")
                rows.append(
                    f"| {load.name} | {metric.label} | {path} | {med:.4g} | {lo:.4g}-{hi:.4g} | "
                    f"{_ratio(med, d)} | {_ratio(med, h)} | {_pct(cpu)} | {_pct(host)} |"
                )
    return "\n".join(rows)


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else ""


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


# --- main --------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell (1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s, 1 round, no warm-up")
    p.add_argument("--only", default=",".join(DEFAULT_LOADS),
                   help=f"loads, of {', '.join(ALL_LOADS)}")  # fmt: skip
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS), help=f"paths, of {', '.join(PATHS)}")
    p.add_argument(
        "--same-processes",
        action="store_true",
        help="start each proxy once for the whole run (default: new processes every round)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="LABEL=TOML",
        help="add path policy-LABEL: l4gw with these [plugin.relay] lines "
        "('eager=promote_after = \"100ms\"')",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--echo-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 1.0, 1, 0.0
    args.only = [x for x in args.only.split(",") if x]
    args.paths = [x for x in args.paths.split(",") if x]
    for name in args.only:
        if name not in ALL_LOADS:
            p.error(f"unknown load {name!r}")
    for item in args.policy:
        label, _, lines = item.partition("=")
        name = f"policy-{label}"
        POLICIES[name] = lines.replace("\\n", "\n")
        PATH_NOTES[name] = f"l4gw with the default policy and [plugin.relay] {lines}"
        args.paths.append(name)
    for name in args.paths:
        if name not in PATHS and name not in POLICIES:
            p.error(f"unknown path {name!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.echo_server:
        echo_server(args.echo_server)
        return 0
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools {missing}", file=sys.stderr)
        return 2
    loads = [ALL_LOADS[name] for name in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-relay-bench-"))
    children = Children(workdir)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        paths = start_paths(children, args.paths, {load.backend for load in loads})
        if args.warmup > 0:
            for load in loads:
                for path in paths:
                    measure(load, path, args.warmup)
        samples = rounds(loads, paths, args, children)
        results = report(loads, paths, samples)
        tiers = [p.name for p in paths if p.name in (*TIER_PATHS, "default", *POLICIES)]
        status = {p.name: p.relay_status() for p in paths if p.status_dir}
        doc = {
            "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "duration": args.duration,
            "rounds": args.rounds,
            "paths": {p.name: PATH_NOTES[p.name] for p in paths},
            "results": results,
            "targets": targets(results, tiers),
            "relay_status": status,
        }
        print(table(results, loads))
        print()
        for line in doc["targets"]:
            print(line)
        for name, st in status.items():
            if st:
                flows = {t: v["flows_total"] for t, v in st["tiers"].items()}
                print(f"{name}: flows per tier {flows}")
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    except (KeyboardInterrupt, _Stop):
        return 130
    except (LoadFailed, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
