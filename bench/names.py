#!/usr/bin/env python3
"""What backends by name cost: new connections/s through a DNS-named cluster vs literal addresses.

One run starts an nginx backend, a dnsmasq serving one name for it
(``backend.l4gw.bench``, A 127.0.0.1, TTL 1 s: the gateway re-resolves it every
second while the load runs) and, per round, two fresh ``l4gw run`` processes in
front of the backend:

* ``literal``: ``endpoints = ["127.0.0.1:PORT"]``;
* ``dns``: ``endpoints = ["backend.l4gw.bench:PORT"]`` with ``[dns] servers`` the
  dnsmasq, ``min_ttl = "1s"``.

wrk runs new-connection load (``Connection: close``: one connection per request,
the case where any per-connection cost of discovery would show) against each, in
interleaved rounds (round r rotates the order; each round starts both gateways
afresh, as bench/telemetry_overhead.py explains). It prints the medians of
connections/s and of the gateway's CPU per connection, the ratios dns÷literal, and
the DNS queries the ``dns`` gateway sent per second of load (from dnsmasq's query
log): about 2 per TTL (A and AAAA), not one per connection, because resolution
runs in a background task and routing reads the last answer. The claim: the
ratios are 1 within the noise of the machine.

    .venv/bin/python bench/dns.py                   # 5 rounds x 5 s (~1 min)
    .venv/bin/python bench/dns.py --quick           # smoke: 1 round x 1 s
    .venv/bin/python bench/dns.py --rounds 9 --seconds 5 --json /tmp/dns.json

Everything is on 127.0.0.1; the children are stopped on exit. The machine may be
shared: read the ratios and the CPU per connection, not the absolute rates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, LoadFailed, Metrics, run_load
from peers import LOOPBACK, ROOT, Child, Children, free_port, gateway_config, start_nginx
from script import interrupt_on_sigterm, missing_tools, write_report

PATHS = ("literal", "dns")
LOAD = "wrk-close"
NAME = "backend.l4gw.bench"


def start_dnsmasq(children: Children) -> tuple[int, Path]:
    """dnsmasq on a free port serving :data:`NAME`; returns (port, its query log)."""
    hosts = children.workdir / "hosts"
    hosts.write_text(f"{LOOPBACK} {NAME}\n")
    log = children.workdir / "dnsmasq-queries.log"
    port = free_port()
    argv = [
        shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--pid-file=",
        *(["--user=root"] if os.geteuid() == 0 else []),
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        f"--addn-hosts={hosts}",
        "--local=/l4gw.bench/",
        "--local-ttl=1",
        "--log-queries",
        f"--log-facility={log}",
    ]
    child = children.start("dnsmasq", argv)
    child.wait_listening([port])
    return port, log


def queries(log: Path) -> int:
    try:
        return len(re.findall(rf"query\[\w+\] {re.escape(NAME)} from", log.read_text()))
    except OSError:
        return 0


def start_path(
    children: Children, name: str, backend: int, dns_port: int, r: int
) -> tuple[int, Child]:
    listen = free_port()
    text = gateway_config({"http": (listen, backend)})
    if name == "dns":
        text = text.replace(
            f'endpoints = ["{LOOPBACK}:{backend}"]', f'endpoints = ["{NAME}:{backend}"]'
        )
        text += f'\n[dns]\nservers = ["{LOOPBACK}:{dns_port}"]\nmin_ttl = "1s"\ntimeout = "1s"\n'
    cfg = children.workdir / f"{name}-{r}.toml"
    cfg.write_text(text)
    child = children.start(
        f"{name}-{r}", [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT
    )
    child.wait_listening([listen])
    return listen, child


def measure(port: int, child: Child, seconds: float) -> Metrics:
    child.check_alive()
    cpu0 = child.cpu_seconds()
    metrics = run_load(LOADS[LOAD], port, seconds)
    cpu = child.cpu_seconds() - cpu0
    child.check_alive()
    if metrics.get("requests"):
        metrics["gw_us_per_conn"] = 1e6 * cpu / metrics["requests"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="per gateway (default 1)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, no warm-up")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.warmup = 1.0, 1, 0.0
    if missing_tools(("wrk", "nginx", "dnsmasq")):
        return 2
    interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-dns-bench-"))
    children = Children(workdir)
    samples: dict[str, list[Metrics]] = {n: [] for n in PATHS}
    dns_queries: list[float] = []
    try:
        backend = free_port()
        start_nginx(children, backend)
        dns_port, log = start_dnsmasq(children)
        for r in range(args.rounds):
            started = {name: start_path(children, name, backend, dns_port, r) for name in PATHS}
            if args.warmup:
                for port, child in started.values():
                    measure(port, child, args.warmup)
            for name in PATHS[r % 2 :] + PATHS[: r % 2]:
                port, child = started[name]
                before = queries(log)
                m = measure(port, child, args.seconds)
                if name == "dns":
                    dns_queries.append((queries(log) - before) / args.seconds)
                samples[name].append(m)
                print(
                    f"round {r + 1}/{args.rounds} {name:8} {m['rps']:9.0f} conn/s  "
                    f"gateway CPU {m.get('gw_us_per_conn', 0):6.1f} µs/conn",
                    file=sys.stderr,
                    flush=True,
                )
            for _, child in started.values():
                children.stop(child)
        report = summarize(samples, dns_queries, args)
        print(table(report))
        write_report(args.json, report)
        return 0
    except KeyboardInterrupt:
        return 130
    except (LoadFailed, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(
    samples: dict[str, list[Metrics]], dns_queries: list[float], args: argparse.Namespace
) -> dict[str, Any]:
    keys = ("rps", "gw_us_per_conn")
    med = {
        n: {k: statistics.median(m.get(k, 0.0) for m in runs) for k in keys}
        for n, runs in samples.items()
    }
    per_round = [
        d["rps"] / lit["rps"]
        for d, lit in zip(samples["dns"], samples["literal"], strict=True)
        if lit["rps"]
    ]
    return {
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "load": LOAD,
        },
        "median": med,
        "dns_over_literal_rps": med["dns"]["rps"] / med["literal"]["rps"]
        if med["literal"]["rps"]
        else 0.0,
        "dns_over_literal_cpu": (
            med["dns"]["gw_us_per_conn"] / med["literal"]["gw_us_per_conn"]
            if med["literal"]["gw_us_per_conn"]
            else 0.0
        ),
        "dns_over_literal_rps_per_round": per_round,
        "dns_queries_per_second": statistics.median(dns_queries) if dns_queries else 0.0,
        "samples": samples,
    }


def table(report: dict[str, Any]) -> str:
    med = report["median"]
    rows = [
        "| path | conn/s | gateway CPU µs/conn |",
        "|---|---:|---:|",
        *(f"| {n} | {med[n]['rps']:.0f} | {med[n]['gw_us_per_conn']:.1f} |" for n in PATHS),
        "",
        f"dns ÷ literal: conn/s {report['dns_over_literal_rps']:.3f}, "
        f"CPU per connection {report['dns_over_literal_cpu']:.3f} "
        f"(per round: {', '.join(f'{x:.3f}' for x in report['dns_over_literal_rps_per_round'])})",
        f"DNS queries sent by the dns gateway: {report['dns_queries_per_second']:.1f}/s of load "
        "(A and AAAA once per 1 s TTL: none per connection)",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
