#!/usr/bin/env python3
"""Benchmark the gateway core against a direct connection and HAProxy.

One run starts the backends (an iperf3 server, an nginx returning a small
200) and the proxies (``l4gw run`` and ``haproxy -db`` in mode tcp, both
single-threaded), then runs every load against every path in interleaved
rounds: round r runs each load on the paths in an order rotated by r, so
slow drift of the machine (thermal, other tenants) spreads over all paths
instead of landing on one. It prints a table of medians with the
gateway÷direct and gateway÷haproxy ratios, and optionally writes JSON.

    .venv/bin/python bench/run.py                      # the full run (~4 min)
    .venv/bin/python bench/run.py --quick              # smoke: 1 s each, 1 round
    .venv/bin/python bench/run.py --only wrk-close --paths gateway,gateway-x2

Everything is on 127.0.0.1; every child process is stopped on exit,
including Ctrl-C and SIGTERM. See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import DEFAULT_LOADS, LOADS, Load, LoadFailed, Metrics, run_load
from peers import (
    REFERENCE_PROXIES,
    ROOT,
    Child,
    Children,
    free_port,
    gateway_sources,
    kernel_threads_seconds,
    kernel_threads_ticks,
    machine_busy_seconds,
    start_gateway,
    start_haproxy,
    start_iperf3_server,
    start_nginx,
    start_reference_proxy,
    third_party_plugins,
)

PATHS = (
    "direct",
    "gateway",
    "gateway-copy",
    "haproxy",
    "uvloop",
    "haproxy-mt",
    "gateway-x2",
    "trio-lean",
    "trio-naive",
)
DEFAULT_PATHS = ("direct", "gateway", "gateway-copy", "haproxy", "uvloop")
PATH_NOTES = {
    "direct": "client -> backend",
    "gateway": "l4gw run, one process (one trio thread), installed plugins, default config",
    "gateway-copy": "the same with the relay plugin disabled: every byte through the core's "
    "copy relay",
    "haproxy": "haproxy mode tcp, nbthread 1",
    "uvloop": "bench/uvloop_proxy.py: a lean asyncio+uvloop proxy (Protocols), the floor "
    "for a Python proxy",
    "haproxy-mt": "haproxy mode tcp, default nbthread (one per CPU)",
    "gateway-x2": "two l4gw processes sharing the ports with SO_REUSEPORT",
    "trio-lean": "bench/trio_proxy.py lean: the gateway's accept, connect and copy relay "
    "in one trio task per connection, without flows, hooks or plugins",
    "trio-naive": "bench/trio_proxy.py naive: trio.serve_tcp and two tasks per connection",
}
TOOLS = ("iperf3", "wrk", "nginx", "haproxy")
# Ratio columns of the table (numerator, denominator), shown when both ran.
RATIOS = (
    ("gateway", "direct"),
    ("gateway", "haproxy"),
    ("gateway-copy", "haproxy"),
    ("gateway", "uvloop"),
    ("gateway-x2", "gateway"),
    ("haproxy-mt", "haproxy"),
)
_COPY_ONLY = 'disable_plugins = ["relay"]\n'


@dataclass
class Path_:
    """One way from the client to the backends."""

    name: str
    ports: dict[str, int]
    """Backend kind ("iperf", "http") -> the port the client connects to."""
    procs: list[Child] = field(default_factory=list)
    """The proxy processes whose CPU time is measured (none for direct)."""
    start: Callable[[], list[Child]] | None = None
    """Starts the proxy processes (none for direct): each round starts new ones."""

    def restart(self, children: Children) -> None:
        """Stop the processes and start new ones on the same ports."""
        if self.start is None:
            return
        for p in self.procs:
            children.stop(p)
        self.procs = self.start()

    def cpu_times(self) -> tuple[float, float]:
        times = [p.cpu_times() for p in self.procs]
        return sum(u for u, _ in times), sum(s for _, s in times)

    def check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()


class _Stop(Exception):
    """SIGTERM: unwind through the ``finally`` that stops the children."""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools {missing}: run scripts/install.sh", file=sys.stderr)
        return 2
    loads = [LOADS[name] for name in args.only]
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-bench-"))
    children = Children(workdir)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_term)
    try:
        paths = _start(children, args, {load.backend for load in loads})
        if args.warmup > 0:
            _log(f"warm-up {args.warmup:g}s per path and load")
            for load in loads:
                for path in paths:
                    _measure(load, path, args.warmup)
        samples = _rounds(loads, paths, args, children)
        report = _report(args, loads, paths, samples)
        print(_table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
            _log(f"wrote {args.json}")
        return 0
    except (KeyboardInterrupt, _Stop):
        _log("interrupted: stopping the children")
        return 130
    except (LoadFailed, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        if args.keep:
            _log(f"logs and configs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per cell (1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 s, 1 round, no warm-up")
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_LOADS),
        help=f"comma-separated loads, of {', '.join(LOADS)} (default: {','.join(DEFAULT_LOADS)})",
    )
    p.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated paths, of {', '.join(PATHS)} (default: {','.join(DEFAULT_PATHS)})",
    )
    p.add_argument("--gateway-extra", default="", help="TOML lines added to the [gateway] table")
    p.add_argument(
        "--gateway-src",
        action="append",
        default=[],
        metavar="LABEL=DIR|PYTHON",
        help="add a path gw-LABEL: l4gw run from DIR/gateway and DIR/l4gw_plugins (A/B a\n"
        "code change), or this tree run by the interpreter PYTHON (A/B an interpreter), in\n"
        'one interleaved run; repeatable; a LABEL with "copy" in it runs with the relay\n'
        "plugin disabled, as gateway-copy)",
    )
    p.add_argument(
        "--same-processes",
        action="store_true",
        help="start each proxy once for the whole run (default: new processes every round)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 1.0, 1, 0.0
    # Other work on the machine moves every number: say how busy it was.
    args.loadavg_at_start = Path("/proc/loadavg").read_text().split()[0]
    args.only = [x for x in args.only.split(",") if x]
    args.paths = [x for x in args.paths.split(",") if x]
    for name in args.only:
        if name not in LOADS:
            p.error(f"unknown load {name!r}; loads: {', '.join(LOADS)}")
    for name in args.paths:
        if name not in PATHS:
            p.error(f"unknown path {name!r}; paths: {', '.join(PATHS)}")
    try:
        args.sources = gateway_sources(args.gateway_src)
    except ValueError as exc:
        p.error(str(exc))
    for name, src in args.sources.items():
        PATH_NOTES[name] = f"l4gw run from {src}"
    args.paths += list(args.sources)
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration must be >= 1 and --rounds >= 1")
    return args


def _start(children: Children, args: argparse.Namespace, backends: set[str]) -> list[Path_]:
    targets: dict[str, int] = {}
    if "iperf" in backends:
        targets["iperf"] = free_port()
        start_iperf3_server(children, targets["iperf"])
    if "http" in backends:
        targets["http"] = free_port()
        start_nginx(children, targets["http"])
    paths: list[Path_] = []
    for name in args.paths:
        if name == "direct":
            paths.append(Path_(name, dict(targets)))
            continue
        routes = {kind: (free_port(), port) for kind, port in targets.items()}
        ports = {kind: listen for kind, (listen, _) in routes.items()}
        start = _starter(children, args, name, routes)
        paths.append(Path_(name, ports, start(), start))
    _log("paths: " + "; ".join(f"{p.name} {p.ports}" for p in paths))
    return paths


def _starter(
    children: Children, args: argparse.Namespace, name: str, routes: dict[str, tuple[int, int]]
) -> Callable[[], list[Child]]:
    """What starts path ``name``'s proxy processes (again, every round)."""

    def start() -> list[Child]:
        if name == "gateway":
            return [start_gateway(children, name, routes, args.gateway_extra)]
        if name == "gateway-copy":
            return [start_gateway(children, name, routes, _COPY_ONLY + args.gateway_extra)]
        if name in args.sources:
            src = args.sources[name]
            extra = (_COPY_ONLY if "copy" in name else "") + args.gateway_extra
            return [start_gateway(children, name, routes, extra, src=src)]
        if name == "gateway-x2":
            return [
                start_gateway(children, f"{name}-{i}", routes, args.gateway_extra, reuseport=True)
                for i in (1, 2)
            ]
        if name in REFERENCE_PROXIES:
            return [start_reference_proxy(children, name, routes)]
        return [start_haproxy(children, name, routes, 1 if name == "haproxy" else None)]

    return start


def _measure(load: Load, path: Path_, seconds: float) -> Metrics:
    path.check_alive()
    (user0, sys0), t0 = path.cpu_times(), time.monotonic()
    busy0, kthreads0 = machine_busy_seconds(), kernel_threads_ticks()
    metrics = run_load(load, path.ports[load.backend], seconds)
    busy1, kthreads1 = machine_busy_seconds(), kernel_threads_ticks()
    (user1, sys1), t1 = path.cpu_times(), time.monotonic()
    path.check_alive()
    # The whole machine's CPU per unit of work (client, backend, proxy, kernel
    # threads): a kernel tier moves work out of the proxy's process into kworkers,
    # where the proxy's own CPU time does not show it.
    _per_unit(metrics, "machine", busy1 - busy0)
    _per_unit(metrics, "kthreads", kernel_threads_seconds(kthreads0, kthreads1))
    if path.procs:
        # CPU per unit of work is the number to compare code changes by: it
        # moves far less than throughput when other work shares the machine.
        cpu = (user1 - user0) + (sys1 - sys0)
        metrics["proxy_cpu_pct"] = 100 * cpu / (t1 - t0)
        if cpu > 0:
            # On loopback the kernel time includes the peers' receive path.
            metrics["proxy_sys_pct"] = 100 * (sys1 - sys0) / cpu
        _per_unit(metrics, "proxy", cpu)
    return metrics


def _per_unit(metrics: Metrics, who: str, cpu: float) -> None:
    """``cpu`` seconds as ``{who}_us_per_req`` and ``{who}_ms_per_gb`` of the load's work."""
    if metrics.get("requests"):
        metrics[f"{who}_us_per_req"] = 1e6 * cpu / metrics["requests"]
    if metrics.get("bytes"):
        metrics[f"{who}_ms_per_gb"] = 1e3 * cpu / (metrics["bytes"] / 1e9)


Samples = dict[str, dict[str, list[Metrics]]]


def _rounds(
    loads: list[Load], paths: list[Path_], args: argparse.Namespace, children: Children
) -> Samples:
    samples: Samples = {load.name: {p.name: [] for p in paths} for load in loads}
    for r in range(args.rounds):
        if r > 0 and not args.same_processes:
            # A CPython process keeps its speed (where its hot objects landed in
            # memory) for life: new processes every round let the median average
            # that out (bench/README.md, "One process per path").
            for path in paths:
                path.restart(children)
                if args.warmup > 0:
                    for load in loads:
                        _measure(load, path, args.warmup)
        for load in loads:
            shift = r % len(paths)
            for path in paths[shift:] + paths[:shift]:
                m = _measure(load, path, args.duration)
                samples[load.name][path.name].append(m)
                shown = ", ".join(f"{k}={m[k]:.4g}" for k in _shown_keys(load, m))
                _log(f"round {r + 1}/{args.rounds} {load.name:16} {path.name:11} {shown}")
    return samples


def _shown_keys(load: Load, m: Metrics) -> list[str]:
    keys = [metric.key for metric in load.metrics]
    keys += ["proxy_cpu_pct", "proxy_us_per_req", "proxy_ms_per_gb"]
    keys += ["kthreads_us_per_req", "machine_us_per_req", "machine_ms_per_gb"]
    keys += [k for k in ("connect_errors", "write_errors", "timeouts", "non_2xx") if m.get(k)]
    return [k for k in keys if k in m]


def _report(
    args: argparse.Namespace, loads: list[Load], paths: list[Path_], samples: Samples
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for load in loads:
        per_path: dict[str, Any] = {}
        for path in paths:
            runs = samples[load.name][path.name]
            keys = sorted({k for run in runs for k in run})
            per_path[path.name] = {
                "median": {k: statistics.median(run[k] for run in runs if k in run) for k in keys},
                "min": {k: min(run[k] for run in runs if k in run) for k in keys},
                "max": {k: max(run[k] for run in runs if k in run) for k in keys},
                "samples": runs,
            }
        results[load.name] = {
            "description": load.description,
            "metrics": [
                {"key": m.key, "label": m.label, "higher_is_better": m.higher_is_better}
                for m in load.metrics
            ],
            "paths": per_path,
        }
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_at_start": args.loadavg_at_start},
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "paths": {p.name: PATH_NOTES[p.name] for p in paths},
            "gateway_extra": args.gateway_extra,
            "gateway_plugins": _gateway_plugins(),
        },
        "results": results,
    }


def _table(report: dict[str, Any]) -> str:
    """Medians per load and metric, with the gateway's ratios (Markdown)."""
    results: dict[str, Any] = report["results"]
    paths = list(next(iter(results.values()))["paths"])
    ratio_cols = [(a, b) for a, b in RATIOS if a in paths and b in paths]
    sources = [p for p in paths if p.startswith("gw-")]
    ratio_cols += [(p, sources[0]) for p in sources[1:]]
    short = {"gateway": "gw", "gateway-copy": "copy", "gateway-x2": "gw-x2"}
    head = ["load", "metric", *paths, *(f"{short.get(a, a)}÷{b}" for a, b in ratio_cols)]
    rows: list[list[str]] = []
    for name, res in results.items():
        per_path = res["paths"]
        metrics = [(m["key"], m["label"]) for m in res["metrics"]]
        metrics.append(("proxy_cpu_pct", "proxy CPU %"))
        metrics.append(("proxy_us_per_req", "proxy CPU µs/req"))
        metrics.append(("proxy_ms_per_gb", "proxy CPU ms/GB"))
        metrics.append(("proxy_sys_pct", "proxy CPU in kernel %"))
        metrics.append(("kthreads_us_per_req", "kernel threads CPU µs/req"))
        metrics.append(("kthreads_ms_per_gb", "kernel threads CPU ms/GB"))
        metrics.append(("machine_us_per_req", "machine CPU µs/req"))
        metrics.append(("machine_ms_per_gb", "machine CPU ms/GB"))
        first = True
        for key, label in metrics:
            if all(key not in per_path[path]["median"] for path in paths):
                continue
            cells = [name if first else "", label]
            first = False
            values: dict[str, float] = {}
            for path in paths:
                med = per_path[path]["median"].get(key)
                if med is None:
                    cells.append("-")
                    continue
                values[path] = med
                cells.append(_fmt(med, per_path[path]["min"][key], per_path[path]["max"][key]))
            for a, b in ratio_cols:
                ok = a in values and b in values and values[b] > 0
                cells.append(f"{values[a] / values[b]:.2f}" if ok else "-")
            rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    m = report["machine"]
    s = report["settings"]
    out = [
        f"{report['date']}  {m['cpu_model']} x{m['nproc']}  kernel {m['kernel']}  "
        f"Python {m['python']}  trio {m['trio']}  "
        f"load average {m['loadavg_at_start']} at start, {m['loadavg']} at end",
        f"gateway plugins: {', '.join(s['gateway_plugins'])}",
        f"{s['rounds']} round(s) x {s['duration_s']:g} s per cell, median (spread = "
        "(max-min)/2 over rounds, shown when > 2%); ratios of medians "
        "(for p99, > 1 means slower)",
        "",
        line(head),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(r) for r in rows),
    ]
    return "\n".join(out)


def _fmt(median: float, lo: float, hi: float) -> str:
    text = f"{median:.3g}" if median < 100 else f"{median:.0f}"
    spread = (hi - lo) / 2 / median if median else 0.0
    return f"{text} ±{spread * 100:.0f}%" if spread > 0.02 else text


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "loadavg": Path("/proc/loadavg").read_text().split()[0],
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": _version_of("trio"),
        "tools": {
            "haproxy": _first_line(["haproxy", "-v"]),
            "nginx": _first_line(["nginx", "-v"]),
            "wrk": _first_line(["wrk", "-v"]),
            "iperf3": _first_line(["iperf3", "--version"]),
        },
    }


def _version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _gateway_plugins() -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "plugins"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    loaded = [
        line.split()[0] for line in done.stdout.splitlines() if line and not line[0].isspace()
    ]
    others = set(third_party_plugins())
    return [name for name in loaded if name not in others]


def _log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
