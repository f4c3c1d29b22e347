#!/usr/bin/env python3
"""What tracing costs: the gateway with a span per connection vs. with telemetry off.

One run starts an nginx backend, a loopback OTLP/HTTP sink (in this process,
a thread that decodes and counts spans) and three ``l4gw run`` processes in
front of the same backend:

* ``disabled``: the telemetry plugin not loaded at all (``disable_plugins``);
* ``off``: the plugin loaded, ``[telemetry] exporter = "none"``: the
  per-connection hooks return at their first line (the "no cost" claim);
* ``traced``: ``exporter = "otlp"`` over HTTP/protobuf to the sink,
  ``sample_ratio = 1.0`` (every connection: a SERVER span, a CLIENT span per
  connect attempt, the events, the metrics);
* ``traced-10%``: the same with ``sample_ratio = 0.1`` (metrics for every
  connection, spans for one in ten).

Then wrk runs new-connection load (``Connection: close``: one connection per
request, the case where a span per connection costs most) and keepalive
request/response load against each, in interleaved rounds (round r rotates
the order, so drift of the machine spreads over all three), and prints the
medians and the ratios traced÷off and off÷disabled, and the gateway's CPU
per connection. The target: tracing costs at most 10 % of connections/s.

    .venv/bin/python bench/telemetry_overhead.py              # 3 rounds x 5 s (~2 min)
    .venv/bin/python bench/telemetry_overhead.py --quick      # smoke: 1 round x 1 s

Everything is on 127.0.0.1; the children are stopped on exit.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, LoadFailed, Metrics, run_load
from peers import LOOPBACK, ROOT, Child, Children, free_port, gateway_config, start_nginx

PATHS = ("disabled", "off", "traced", "traced-10%")
TARGET_RATIO = 0.90
"""traced ÷ off connections/s must stay at or above this."""


class SpanSink:
    """A minimal OTLP/HTTP receiver on loopback.

    It only stores the request bodies while the load runs: decoding them
    here would put a collector's CPU on the two cores the gateway is being
    measured on. :meth:`spans` decodes and counts afterwards.
    """

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    if self.headers.get("Content-Encoding") == "gzip":
                        body = gzip.decompress(body)
                    sink.bodies.append(body)
                # An empty Export*ServiceResponse serializes to no bytes.
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self, start: int = 0) -> int:
        """Spans in the trace requests received from the ``start``-th on."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        total = 0
        for body in self.bodies[start:]:
            request = ExportTraceServiceRequest.FromString(body)
            total += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return total

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_path(children: Children, name: str, backend: int, sink: SpanSink) -> tuple[int, Child]:
    listen = free_port()
    routes = {"http": (listen, backend)}
    extra = 'disable_plugins = ["telemetry"]\n' if name == "disabled" else ""
    telemetry = {
        "disabled": "",
        "off": '\n[telemetry]\nexporter = "none"\n',
        "traced": '\n[telemetry]\nexporter = "otlp"\nsample_ratio = 1.0\n',
        "traced-10%": '\n[telemetry]\nexporter = "otlp"\nsample_ratio = 0.1\n',
    }[name]
    cfg = children.workdir / f"{name}.toml"
    cfg.write_text(gateway_config(routes, extra) + telemetry)
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOOPBACK}:{sink.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "",
        "OTEL_TRACES_EXPORTER": "",
        "OTEL_METRICS_EXPORTER": "",
    }
    child = children.start(
        name, [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=ROOT, env=env
    )
    child.wait_listening([listen])
    return listen, child


def measure(load: str, port: int, child: Child, seconds: float) -> Metrics:
    child.check_alive()
    cpu0 = child.cpu_seconds()
    metrics = run_load(LOADS[load], port, seconds)
    cpu = child.cpu_seconds() - cpu0
    child.check_alive()
    if metrics.get("requests"):
        metrics["gw_us_per_req"] = 1e6 * cpu / metrics["requests"]
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="per path and load (default 1)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, no warm-up")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.warmup = 1.0, 1, 0.0
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"bench: missing tools {missing}: run scripts/install.sh", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-telemetry-bench-"))
    children = Children(workdir)
    sink = SpanSink()
    loads = ("wrk-close", "wrk-keepalive")
    samples: dict[str, dict[str, list[Metrics]]] = {ld: {n: [] for n in PATHS} for ld in loads}
    try:
        backend = free_port()
        start_nginx(children, backend)
        paths = {name: start_path(children, name, backend, sink) for name in PATHS}
        if args.warmup:
            for load in loads:
                for port, child in paths.values():
                    measure(load, port, child, args.warmup)
        first_body, traced_conns = len(sink.bodies), 0.0
        for r in range(args.rounds):
            for load in loads:
                order = list(PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)])
                for name in order:
                    port, child = paths[name]
                    m = measure(load, port, child, args.seconds)
                    samples[load][name].append(m)
                    if name == "traced" and load == "wrk-close":
                        traced_conns += m["requests"]
                    print(
                        f"round {r + 1}/{args.rounds} {load:14} {name:9} "
                        f"{m['rps']:9.0f}/s  gateway CPU {m.get('gw_us_per_req', 0):6.1f} µs/req",
                        file=sys.stderr,
                        flush=True,
                    )
        # Let the last batches arrive: the schedule delay is 5 s.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and sink.spans(first_body) < 2 * traced_conns:
            time.sleep(1.0)
        report = summarize(samples, sink.spans(first_body), traced_conns, args)
        print(table(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    except KeyboardInterrupt:
        return 130
    except (LoadFailed, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(
    samples: dict[str, dict[str, list[Metrics]]],
    spans: int,
    traced_conns: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for load, per_path in samples.items():
        med = {
            name: {k: statistics.median(run[k] for run in runs) for k in ("rps", "gw_us_per_req")}
            for name, runs in per_path.items()
        }
        results[load] = {
            "median": med,
            "traced_over_off": med["traced"]["rps"] / med["off"]["rps"],
            "traced10_over_off": med["traced-10%"]["rps"] / med["off"]["rps"],
            "off_over_disabled": med["off"]["rps"] / med["disabled"]["rps"],
            "samples": per_path,
        }
    return {
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "warmup": args.warmup},
        "results": results,
        # Every traced connection has a SERVER span and one CLIENT span per attempt
        # (one here): fewer than 2 per connection means spans were dropped.
        "spans_received": spans,
        "traced_connections": traced_conns,
        "target": TARGET_RATIO,
        "target_met": results["wrk-close"]["traced_over_off"] >= TARGET_RATIO,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| load | metric | disabled | off | traced | traced-10% | traced÷off | traced-10%÷off "
        "| off÷disabled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load, res in report["results"].items():
        med = res["median"]
        label = "conn/s" if load == "wrk-close" else "req/s"
        lines.append(
            f"| {load} | {label} | {med['disabled']['rps']:.0f} | {med['off']['rps']:.0f} | "
            f"{med['traced']['rps']:.0f} | {med['traced-10%']['rps']:.0f} | "
            f"{res['traced_over_off']:.3f} | {res['traced10_over_off']:.3f} | "
            f"{res['off_over_disabled']:.3f} |"
        )
        cpu = " | ".join(f"{med[p]['gw_us_per_req']:.1f}" for p in PATHS)
        lines.append(f"| | gateway CPU µs/req | {cpu} | | | |")
    ratio = report["results"]["wrk-close"]["traced_over_off"]
    verdict = "met" if report["target_met"] else "NOT met"
    lines.append("")
    lines.append(
        f"tracing at 100 % sampling keeps {ratio:.1%} of connections/s "
        f"(target >= {report['target']:.0%}: {verdict}); spans received "
        f"{report['spans_received']} for {report['traced_connections']:.0f} connections of the "
        "100 % path (2 per connection expected; the 10 % path adds about a tenth)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
