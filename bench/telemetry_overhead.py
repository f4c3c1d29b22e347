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

* ``off-before`` and ``traced-before`` (with ``--baseline DIR``): ``off`` and
  ``traced`` run by another version of l4gw, for a before/after comparison in
  the same run. DIR is a copy of the tree taken before a change, with the
  ``gateway`` package and the plugins as package ``l4gw_plugins`` (what
  ``bench/conn_cost.py --gateway-src`` takes too)::

      mkdir /tmp/before && git archive HEAD gateway plugins | tar -x -C /tmp/before
      mv /tmp/before/plugins /tmp/before/l4gw_plugins
      cp gateway/bpf/*.o /tmp/before/gateway/bpf/

  Both versions' traced÷off are reported: tracing's share of a cheaper core is
  larger, so compare the ratios and the CPU µs per connection, not one alone.

Then wrk runs new-connection load (``Connection: close``: one connection per
request, the case where a span per connection costs most) and keepalive
request/response load against each, in interleaved rounds (round r rotates
the order, so drift of the machine spreads over all of them; every round
starts the gateways afresh, see below), and prints the
medians and the ratios traced÷off and off÷disabled, the gateway's CPU per
connection and, separately, its span exporter process's (the ``traced``
paths export from a child process; the machine has to pay for that CPU
too), and the load average before and after (the machine may be shared:
read the ratios, not the absolute numbers). The target: tracing costs at
most 10 % of connections/s.

    .venv/bin/python bench/telemetry_overhead.py              # 3 rounds x 5 s (~2 min)
    .venv/bin/python bench/telemetry_overhead.py --quick      # smoke: 1 round x 1 s
    .venv/bin/python bench/telemetry_overhead.py --rounds 7 --loads wrk-close \
        --baseline /tmp/l4gw-telemetry-before                 # before/after
    .venv/bin/python bench/telemetry_overhead.py --paths off,traced --rounds 15 \
        --seconds 4 --loads wrk-close                         # the target alone, more pairs
    .venv/bin/python bench/telemetry_overhead.py --pin ...    # each gateway on CPU 0

``--pin`` runs each gateway's trio thread on the first CPU and everything else
(wrk, nginx, the sink, the span exporter processes) on the others: a gateway
is one thread, deployed with a core of its own (``[gateway] workers``), and
on two shared vCPUs the load generator and the backend otherwise take turns
on its core, which makes the ratio swing by several points from one run to
the next. The verdict line gives a 95 % bootstrap interval of the median of
the per-round ratios.

Each round runs new gateway processes (``--same-processes`` keeps the first
ones): a CPython process's speed depends by a few percent, for its whole
life, on where its hot objects happen to land in memory. With one process
per path for the whole run that luck was the same in every round, so the
rounds could not average it out (two identical configurations, the plugin
not loaded and ``exporter = "none"``, measured up to 7 % apart in one run;
the traced gateway with its hooks emptied, 2 to 7 % slower than ``off``).

Everything is on 127.0.0.1; the children are stopped on exit.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, LoadFailed, Metrics, run_load
from peers import (
    LOOPBACK,
    ROOT,
    Child,
    Children,
    child_pids,
    free_port,
    gateway_config,
    start_nginx,
)
from script import interrupt_on_sigterm, missing_tools, write_report

PATHS = ("disabled", "off", "traced", "traced-10%")
BASELINE = "traced-before"
BASELINE_OFF = "off-before"
LOADS_RUN = ("wrk-close", "wrk-keepalive")
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


def baseline_tree(source: Path) -> Path:
    """``source`` checked: a tree copy holding ``gateway`` and ``l4gw_plugins``."""
    for package in ("gateway", "l4gw_plugins"):
        if not (source / package / "__init__.py").exists():
            raise RuntimeError(
                f"--baseline: {source / package} is missing (a tree copy: see the docstring)"
            )
    return source.resolve()


def start_path(
    children: Children, name: str, backend: int, sink: SpanSink, baseline: Path | None = None
) -> tuple[int, Child]:
    listen = free_port()
    routes = {"http": (listen, backend)}
    extra = 'disable_plugins = ["telemetry"]\n' if name == "disabled" else ""
    telemetry = {
        "disabled": "",
        "off": '\n[telemetry]\nexporter = "none"\n',
        "traced": '\n[telemetry]\nexporter = "otlp"\nsample_ratio = 1.0\n',
        "traced-10%": '\n[telemetry]\nexporter = "otlp"\nsample_ratio = 0.1\n',
        BASELINE_OFF: '\n[telemetry]\nexporter = "none"\n',
        BASELINE: '\n[telemetry]\nexporter = "otlp"\nsample_ratio = 1.0\n',
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
    cwd = ROOT
    if name in (BASELINE, BASELINE_OFF):
        assert baseline is not None
        # The copy's packages come first (before the editable install's); run from it,
        # so that the working tree is not on sys.path either.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(baseline), os.environ.get("PYTHONPATH", "")) if p
        )
        cwd = baseline
    child = children.start(
        name, [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], cwd=cwd, env=env
    )
    child.wait_listening([listen])
    return listen, child


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(load: str, port: int, child: Child, seconds: float) -> Metrics:
    child.check_alive()
    kids = child_pids(child.pid)
    cpu0 = child.cpu_seconds()
    kids0 = sum(process_cpu(k) for k in kids)
    metrics = run_load(LOADS[load], port, seconds)
    cpu = child.cpu_seconds() - cpu0
    kids_cpu = sum(process_cpu(k) for k in kids) - kids0
    child.check_alive()
    if metrics.get("requests"):
        metrics["gw_us_per_req"] = 1e6 * cpu / metrics["requests"]
        metrics["exporter_us_per_req"] = 1e6 * kids_cpu / metrics["requests"]
    return metrics


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="per path and load (default 1)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, no warm-up")
    p.add_argument(
        "--loads", nargs="+", choices=LOADS_RUN, default=list(LOADS_RUN), help="loads to run"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="a tree copy of another l4gw version, run as paths off-before and "
        "traced-before (see above)",
    )
    p.add_argument(
        "--paths",
        default=",".join(PATHS),
        # argparse formats help with %: the "10%" of a path name is written "10%%".
        help=f"paths to run, of {', '.join(PATHS).replace('%', '%%')} "
        "(off and traced always; default all)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="gateways on CPU 0, everything else (wrk, nginx, the sink, exporter processes) "
        "on the other CPUs: the gateway's own core decides its rate",
    )
    p.add_argument(
        "--same-processes",
        action="store_true",
        help="start each gateway once for the whole run instead of afresh every round",
    )
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    paths = [n for n in args.paths.split(",") if n]
    unknown = set(paths) - set(PATHS)
    if unknown:
        p.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}")
    args.paths = tuple(n for n in PATHS if n in {*paths, "off", "traced"})
    if args.quick:
        args.seconds, args.rounds, args.warmup = 1.0, 1, 0.0
    if missing_tools(("wrk", "nginx")):
        return 2
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cpus) < 2:
            p.error("--pin needs two CPUs")
        # Children inherit this; each gateway's main thread then moves to the first
        # CPU (its exporter process, started before, stays on the others).
        os.sched_setaffinity(0, cpus[1:])
    interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="l4gw-telemetry-bench-"))
    children = Children(workdir)
    sink = SpanSink()
    loads = tuple(args.loads)
    names = args.paths + ((BASELINE_OFF, BASELINE) if args.baseline else ())
    samples: dict[str, dict[str, list[Metrics]]] = {ld: {n: [] for n in names} for ld in loads}
    load_before = load_average()
    try:
        baseline = baseline_tree(args.baseline) if args.baseline else None
        backend = free_port()
        start_nginx(children, backend)

        traced_conns = 0.0  # through the traced path, warm-ups included: each one is spans

        def start_gateways() -> dict[str, tuple[int, Child]]:
            nonlocal traced_conns
            started = {name: start_path(children, name, backend, sink, baseline) for name in names}
            for name, (port, child) in started.items():
                if args.pin:
                    os.sched_setaffinity(child.pid, cpus[:1])
                if args.warmup:
                    for load in loads:
                        m = measure(load, port, child, args.warmup)
                        if name == "traced" and load == "wrk-close":
                            traced_conns += m["requests"]
            return started

        running = start_gateways()
        for r in range(args.rounds):
            if r and not args.same_processes:
                # Fresh processes each round: where a process's hot objects land in
                # memory shifts its speed by a few percent for its whole life (two
                # identical configurations measured up to 7 % apart in one run);
                # new ones each round turn that into noise the rounds average out.
                for _, child in running.values():
                    children.stop(child)
                running = start_gateways()
            for load in loads:
                order = list(names[r % len(names) :] + names[: r % len(names)])
                for name in order:
                    port, child = running[name]
                    m = measure(load, port, child, args.seconds)
                    samples[load][name].append(m)
                    if name == "traced" and load == "wrk-close":
                        traced_conns += m["requests"]
                    print(
                        f"round {r + 1}/{args.rounds} {load:14} {name:13} "
                        f"{m['rps']:9.0f}/s  gateway CPU {m.get('gw_us_per_req', 0):6.1f} µs/req"
                        f" + exporter {m.get('exporter_us_per_req', 0):5.1f}"
                        f"  (load {load_average():.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
        # Let the last batches arrive: the schedule delay is 5 s.
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and sink.spans() < 2 * traced_conns:
            time.sleep(1.0)
        report = summarize(samples, sink.spans(), traced_conns, args)
        report["load_average"] = {"before": load_before, "after": load_average()}
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
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summarize(
    samples: dict[str, dict[str, list[Metrics]]],
    spans: int,
    traced_conns: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    keys = ("rps", "gw_us_per_req", "exporter_us_per_req")
    for load, per_path in samples.items():
        med = {
            name: {k: statistics.median(run.get(k, 0.0) for run in runs) for k in keys}
            for name, runs in per_path.items()
        }
        off = med["off"]["rps"]
        per_round = [
            t["rps"] / o["rps"] for t, o in zip(per_path["traced"], per_path["off"], strict=True)
        ]
        res: dict[str, Any] = {
            "median": med,
            "traced_over_off": med["traced"]["rps"] / off,
            "traced10_over_off": med["traced-10%"]["rps"] / off if "traced-10%" in med else None,
            "off_over_disabled": off / med["disabled"]["rps"] if "disabled" in med else None,
            # Ratios within each round (same minute of the machine), then their median:
            # steadier than the ratio of medians when the machine's load drifts.
            "traced_over_off_per_round": statistics.median(per_round),
            "traced_over_off_per_round_ci": median_ci(per_round),
            "samples": per_path,
        }
        if BASELINE in med:
            # The baseline's tracing against its own core, and its core against ours.
            res["before_over_off"] = med[BASELINE]["rps"] / med[BASELINE_OFF]["rps"]
            res["before_over_off_per_round"] = statistics.median(
                t["rps"] / o["rps"]
                for t, o in zip(per_path[BASELINE], per_path[BASELINE_OFF], strict=True)
            )
            res["off_over_off_before"] = off / med[BASELINE_OFF]["rps"]
        results[load] = res
    main = results.get("wrk-close") or next(iter(results.values()))
    return {
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "loads": list(samples),
            "baseline": str(args.baseline) if args.baseline else None,
            "pin": args.pin,
        },
        "results": results,
        # Every traced connection has a SERVER span and one CLIENT span per attempt
        # (one here): fewer than 2 per connection means spans were dropped.
        "spans_received": spans,
        "traced_connections": traced_conns,
        "target": TARGET_RATIO,
        "target_met": main["traced_over_off"] >= TARGET_RATIO,
    }


def median_ci(values: list[float], level: float = 0.95, n: int = 5000) -> tuple[float, float]:
    """A percentile-bootstrap confidence interval of the median of ``values``
    (fixed seed: the same samples give the same interval)."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    cut = int(n * (1 - level) / 2)
    return medians[cut], medians[n - 1 - cut]


def table(report: dict[str, Any]) -> str:
    results = report["results"]
    names = [
        n for n in (*PATHS, BASELINE_OFF, BASELINE) if n in next(iter(results.values()))["median"]
    ]
    lines = [
        "| load | metric | "
        + " | ".join(names)
        + " | traced÷off | traced-10%÷off | off÷disabled"
        + (" | before÷off |" if BASELINE in names else " |"),
        "|---|---|" + "---|" * (len(names) + 3 + (BASELINE in names)),
    ]
    for load, res in results.items():
        med = res["median"]
        label = "conn/s" if load == "wrk-close" else "req/s"
        ratios = " | ".join(
            "" if res[k] is None else f"{res[k]:.3f}"
            for k in ("traced_over_off", "traced10_over_off", "off_over_disabled")
        )
        if BASELINE in names:
            ratios += f" | {res['before_over_off']:.3f}"
        lines.append(
            f"| {load} | {label} | "
            + " | ".join(f"{med[n]['rps']:.0f}" for n in names)
            + f" | {ratios} |"
        )
        blank = " |" * (3 + (BASELINE in names))
        cpu = " | ".join(f"{med[n]['gw_us_per_req']:.1f}" for n in names)
        lines.append(f"| | gateway CPU µs/req | {cpu} |{blank}")
        exp = " | ".join(f"{med[n]['exporter_us_per_req']:.1f}" for n in names)
        lines.append(f"| | exporter process CPU µs/req | {exp} |{blank}")
    main_load = "wrk-close" if "wrk-close" in results else next(iter(results))
    main = results[main_load]
    verdict = "met" if report["target_met"] else "NOT met"
    lines.append("")
    lines.append(
        f"{main_load}: tracing at 100 % sampling keeps {main['traced_over_off']:.1%} of the "
        f"rate with telemetry off (median of per-round ratios "
        f"{main['traced_over_off_per_round']:.1%}, 95 % CI "
        f"{main['traced_over_off_per_round_ci'][0]:.1%} to "
        f"{main['traced_over_off_per_round_ci'][1]:.1%}; "
        f"target >= {report['target']:.0%}: {verdict})"
        + (
            f"; the baseline keeps {main['before_over_off']:.1%} of its own off "
            f"(per round {main['before_over_off_per_round']:.1%}), and off runs at "
            f"{main['off_over_off_before']:.1%} of the baseline's off"
            if "before_over_off" in main
            else ""
        )
    )
    load = report.get("load_average")
    if load:
        lines.append(
            f"load average {load['before']:.2f} before, {load['after']:.2f} after "
            f"({os.cpu_count()} CPUs)"
        )
    lines.append(
        f"spans received {report['spans_received']} for {report['traced_connections']:.0f} "
        "connections of the 100 % path (2 per connection expected; the 10 % path adds about a "
        "tenth, traced-before as many again)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
