#!/usr/bin/env python3
"""Benchmark UDP through the gateway against the same loads sent directly.

One run starts a UDP backend (echo, and a counting sink for one-way loads) and
``l4gw run`` with a plain UDP listener in front of it, then runs every load on
both paths in interleaved rounds (round r starts with the other path than
round r-1, so drift of the machine lands on both). Loads:

* ``rr-1``, ``rr-32``: request/response, 1 or 32 sessions each with one
  request outstanding (a closed loop: the next request leaves when the reply
  arrived); a reply missing for 200 ms is resent and counted as lost.
  Reports replies/s.
* ``bulk-64``, ``bulk-1400``: one sender blasting datagrams of 64 or 1400
  bytes as fast as it can for the load's duration; the sink counts what
  arrived. Reports datagrams/s delivered and the share lost (a proxy that
  cannot keep up loses datagrams, as the kernel drops what does not fit a
  full receive buffer).

Every process is on 127.0.0.1 and bounded in time; the load generators, the
backend and the gateway are separate processes (one core each would be ideal;
this VM has two, so absolute numbers are low and ratios are what to read).

    .venv/bin/python bench/udp.py                 # 3 rounds of 3 s per load
    .venv/bin/python bench/udp.py --quick         # 1 round of 1 s (smoke)
    .venv/bin/python bench/udp.py --json out.json
    .venv/bin/python bench/udp.py --gateway-src ref=/tmp/ref   # A/B: adds path gw-ref
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (
    LOOPBACK,
    ROOT,
    THIS_TREE,
    Child,
    Children,
    GatewaySource,
    disabling_third_party,
    gateway_sources,
)

PATHS = ("direct", "gateway", "nginx")
#: nginx's stream module (Debian: libnginx-mod-stream), the reference UDP proxy.
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
LOADS = ("rr-1", "rr-32", "bulk-64", "bulk-1400")
RESEND_AFTER = 0.2
REPORT = b"?report"


# --- the processes the run starts (also this file, in a role) --------------------------------


def serve_backend(port: int) -> None:
    """Echo each datagram; a datagram starting with b"!" is counted, not echoed, and
    ``REPORT`` answers with (and resets) the count of the peer asking."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((LOOPBACK, port))
    counts: dict[Any, int] = {}
    while True:
        data, peer = sock.recvfrom(65536)
        if data[:1] == b"!":
            counts[peer] = counts.get(peer, 0) + 1
        elif data == REPORT:
            sock.sendto(b"%d" % counts.pop(peer, 0), peer)
        else:
            sock.sendto(data, peer)


def run_rr(port: int, seconds: float, sessions: int, size: int) -> dict[str, Any]:
    """Closed-loop request/response on ``sessions`` sockets for ``seconds``."""
    sel = selectors.DefaultSelector()
    socks = []
    payload = b"r" * size
    for _ in range(sessions):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect((LOOPBACK, port))
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    sent_at = {}
    replies = lost = 0
    start = time.monotonic()
    end = start + seconds
    for s in socks:
        s.send(payload)
        sent_at[s] = start
    now = start
    while now < end:
        for key, _ in sel.select(0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                while True:
                    s.recv(65536)
                    replies += 1
            except BlockingIOError:
                pass
            except ConnectionRefusedError:
                pass
            s.send(payload)
            sent_at[s] = time.monotonic()
        now = time.monotonic()
        for s, at in sent_at.items():
            if now - at > RESEND_AFTER:
                lost += 1
                s.send(payload)
                sent_at[s] = now
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    return {"replies": replies, "per_s": replies / elapsed, "lost": lost, "seconds": elapsed}


def run_bulk(port: int, seconds: float, size: int) -> dict[str, Any]:
    """Send ``size``-byte datagrams for ``seconds``; ask the sink how many arrived."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((LOOPBACK, port))
    payload = b"!" + b"b" * (size - 1)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    send = s.send
    while True:
        for _ in range(256):
            try:
                send(payload)
                sent += 1
            except (ConnectionRefusedError, BlockingIOError):
                pass
        if time.monotonic() >= end:
            break
    elapsed = time.monotonic() - start
    time.sleep(0.3)  # what is still queued along the path arrives (or is dropped)
    s.settimeout(0.5)
    received = None
    for _ in range(10):
        s.send(REPORT)
        try:
            received = int(s.recv(100))
            break
        except (TimeoutError, ValueError):
            continue
    s.close()
    if received is None:
        raise RuntimeError("the sink did not report")
    return {
        "sent": sent,
        "received": received,
        "per_s": received / elapsed,
        "sent_per_s": sent / elapsed,
        "loss": 1 - received / sent if sent else 0.0,
        "seconds": elapsed,
    }


# --- orchestration ----------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def gateway_config(listen: int, backend: int) -> str:
    return f"""
[gateway]
drain_timeout = "1s"
log_level = "warning"
{disabling_third_party()}
[[listener]]
name = "udp"
bind = "{LOOPBACK}:{listen}"
protocol = "udp"
session_idle_timeout = "30s"
max_sessions = 10000

[[route]]
listener = "udp"
cluster = "backend"

[cluster.backend]
endpoints = ["{LOOPBACK}:{backend}"]
"""


def start_gateway(
    children: Children,
    listen: int,
    backend: int,
    name: str = "gateway",
    src: GatewaySource = THIS_TREE,
) -> Child:
    """``l4gw run`` from this tree, or as ``src`` says (another tree or interpreter)."""
    cfg = children.workdir / f"{name}.toml"
    cfg.write_text(gateway_config(listen, backend))
    env = {"PYTHONUNBUFFERED": "1", **(src.env() or {})}
    child = children.start(
        name, [*src.argv(), "run", "-c", str(cfg)], cwd=src.tree or ROOT, env=env
    )
    deadline = time.monotonic() + 15
    # log_level = "warning" hides "ready:": wait for the bound socket instead.
    while listen not in bound_udp_ports():
        child.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"gateway not ready:\n{child.log()}")
        time.sleep(0.02)
    return child


def nginx_udp_config(workdir: Path, listen: int, backend: int) -> str:
    """nginx's stream module proxying UDP, one process (no master), as HAProxy's one
    thread is the TCP reference: a session per client address, kept 30 s."""
    return f"""
load_module {NGINX_STREAM_MODULE};
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx-udp.pid;
error_log {workdir}/nginx-udp-error.log warn;
events {{ worker_connections 20000; }}
stream {{
    server {{
        listen {LOOPBACK}:{listen} udp;
        proxy_pass {LOOPBACK}:{backend};
        proxy_timeout 30s;
    }}
}}
"""


def start_nginx_udp(children: Children, listen: int, backend: int) -> Child:
    cfg = children.workdir / "nginx-udp.conf"
    cfg.write_text(nginx_udp_config(children.workdir, listen, backend))
    child = children.start("nginx-udp", ["nginx", "-c", str(cfg), "-p", str(children.workdir)])
    deadline = time.monotonic() + 15
    while listen not in bound_udp_ports():
        child.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx not ready:\n{child.log()}")
        time.sleep(0.02)
    return child


def bound_udp_ports() -> set[int]:
    ports = set()
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        ports.add(int(line.split()[1].split(":")[1], 16))
    return ports


def run_load(load: str, port: int, seconds: float) -> dict[str, Any]:
    """Run one load in a child process (its own core, its own GIL)."""
    argv = [sys.executable, __file__, "_load", load, str(port), str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode:
        raise RuntimeError(f"{load}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def load_main(load: str, port: int, seconds: float) -> None:
    if load.startswith("rr-"):
        result = run_rr(port, seconds, int(load[3:]), 32)
    else:
        result = run_bulk(port, seconds, int(load[5:]))
    print(json.dumps(result))


def bench(
    loads: list[str],
    seconds: float,
    rounds: int,
    workdir: Path,
    sources: dict[str, GatewaySource] | None = None,
) -> dict[str, Any]:
    children = Children(workdir)
    try:
        backend_port = free_udp_port()
        backend = children.start(
            "backend", [sys.executable, __file__, "_backend", str(backend_port)]
        )
        deadline = time.monotonic() + 10
        while backend_port not in bound_udp_ports():
            backend.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("backend not ready")
            time.sleep(0.02)
        gw_port = free_udp_port()
        proxies = {"gateway": start_gateway(children, gw_port, backend_port)}
        ports = {"direct": backend_port, "gateway": gw_port}
        for label, src in (sources or {}).items():
            ports[label] = free_udp_port()
            proxies[label] = start_gateway(children, ports[label], backend_port, label, src)
        if NGINX_STREAM_MODULE.exists():
            ports["nginx"] = free_udp_port()
            proxies["nginx"] = start_nginx_udp(children, ports["nginx"], backend_port)
        else:
            print(f"udp: {NGINX_STREAM_MODULE} missing (libnginx-mod-stream): no nginx path")
        paths = [p for p in PATHS if p in ports] + list(sources or {})
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            load: {path: [] for path in paths} for load in loads
        }
        for r in range(rounds):
            for load in loads:
                shift = r % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    proxy = proxies.get(path)
                    cpu0 = proxy.cpu_seconds() if proxy else 0.0
                    result = run_load(load, ports[path], seconds)
                    if proxy is not None:
                        # Over the load's own duration: the proxy idles while the
                        # load process starts, and that costs it (almost) no CPU.
                        busy = proxy.cpu_seconds() - cpu0
                        result["proxy_cpu_pct"] = 100 * busy / result["seconds"]
                        if path == "gateway" or path in (sources or {}):
                            result["gateway_cpu_pct"] = result["proxy_cpu_pct"]
                        proxy.check_alive()
                    results[load][path].append(result)
        return {
            "seconds": seconds,
            "rounds": rounds,
            "cpus": os.cpu_count(),
            "results": {
                load: {
                    path: {
                        "median_per_s": statistics.median(x["per_s"] for x in runs),
                        "runs": runs,
                    }
                    for path, runs in by_path.items()
                }
                for load, by_path in results.items()
            },
        }
    finally:
        children.stop_all()


def table(report: dict[str, Any]) -> str:
    others = [p for p in next(iter(report["results"].values()), {}) if p.startswith("gw-")]
    lines = [
        "| load | unit | direct | gateway | nginx | gw÷direct | gw÷nginx "
        "| loss direct / gateway | gateway CPU | nginx CPU |"
        + "".join(f" {p} | gw÷{p} | {p} CPU |" for p in others),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 * len(others)),
    ]
    for load, by_path in report["results"].items():
        direct = by_path["direct"]["median_per_s"]
        gw = by_path["gateway"]["median_per_s"]
        ngx = by_path.get("nginx", {}).get("median_per_s")
        ngx_cpu = (
            f"{statistics.median(r['proxy_cpu_pct'] for r in by_path['nginx']['runs']):.0f}%"
            if ngx is not None
            else "-"
        )
        runs = by_path["gateway"]["runs"]
        direct_runs = by_path["direct"]["runs"]
        if load.startswith("rr-"):
            unit = "replies/s"
            loss = f"{sum(r['lost'] for r in direct_runs)} / {sum(r['lost'] for r in runs)} resent"
        else:
            unit = "datagrams/s"
            loss = " / ".join(
                f"{100 * statistics.median(r['loss'] for r in x):.1f}%" for x in (direct_runs, runs)
            )
        cpu = statistics.median(r["gateway_cpu_pct"] for r in runs)
        ratio = gw / direct if direct else 0.0
        ngx_cells = f"{ngx:,.0f} | " if ngx is not None else "- | "
        ngx_ratio = f"{gw / ngx:.2f}" if ngx else "-"
        extra = ""
        for p in others:
            rate = by_path[p]["median_per_s"]
            p_cpu = statistics.median(r["gateway_cpu_pct"] for r in by_path[p]["runs"])
            extra += f" {rate:,.0f} | {gw / rate if rate else 0.0:.2f} | {p_cpu:.0f}% |"
        lines.append(
            f"| {load} | {unit} | {direct:,.0f} | {gw:,.0f} | {ngx_cells}{ratio:.2f} | "
            f"{ngx_ratio} | {loss} | {cpu:.0f}% | {ngx_cpu} |" + extra
        )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_backend":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_backend(int(sys.argv[2]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        load_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s per load")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each load run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help=f"comma-separated loads of {','.join(LOADS)}")
    parser.add_argument("--json", help="also write the full report here")
    parser.add_argument(
        "--gateway-src",
        action="append",
        default=[],
        metavar="LABEL=DIR|PYTHON",
        help="add a path gw-LABEL: l4gw run from DIR/gateway and DIR/l4gw_plugins (A/B a "
        "code change), or this tree run by the interpreter PYTHON (A/B an interpreter), "
        "in the same interleaved rounds; repeatable",
    )
    args = parser.parse_args()
    try:
        sources = gateway_sources(args.gateway_src)
    except ValueError as exc:
        parser.error(str(exc))
    seconds, rounds = (1.0, 1) if args.quick else (args.seconds, args.rounds)
    loads = args.only.split(",") if args.only else list(LOADS)
    unknown = [x for x in loads if x not in LOADS]
    if unknown:
        parser.error(f"unknown loads {unknown}; choose from {', '.join(LOADS)}")
    with tempfile.TemporaryDirectory(prefix="l4gw-udp-bench-") as tmp:
        report = bench(loads, seconds, rounds, Path(tmp), sources)
    print(f"UDP, 127.0.0.1, {rounds} round(s) of {seconds:g} s per load, medians:")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
