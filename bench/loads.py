"""The loads: what each one runs against a path, and how its output is read.

A load is a client command line (iperf3 or wrk) pointed at a host:port, and
a parser turning the client's output into named numbers. The parsers are
pure functions on text, so they can be checked without running anything.
Every client run is bounded: its own duration plus a hard timeout.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from peers import LOOPBACK

Metrics = dict[str, float]


@dataclass(frozen=True)
class Metric:
    """One number a load reports."""

    key: str
    """Key in the load's result dict."""
    label: str
    """Column label in the table."""
    higher_is_better: bool


@dataclass(frozen=True)
class Load:
    """One kind of traffic, run the same way against every path."""

    name: str
    backend: str
    """Which backend it needs: "iperf" or "http"."""
    description: str
    metrics: tuple[Metric, ...]
    argv: Callable[[int, float], list[str]]
    """(port, seconds) -> the client command line."""
    parse: Callable[[str], Metrics]


class LoadFailed(Exception):
    """The client failed or its output made no sense."""


WRK_CONNECTIONS = 50
WRK_THREADS = 2


def run_load(load: Load, port: int, seconds: float) -> Metrics:
    """Run ``load`` against ``LOOPBACK:port`` for ``seconds``.

    Raises:
        LoadFailed: the client exited non-zero, timed out or printed nonsense.
    """
    argv = load.argv(port, seconds)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired as exc:
        raise LoadFailed(f"{load.name}: {argv[0]} did not finish: {exc}") from exc
    if done.returncode != 0:
        raise LoadFailed(
            f"{load.name}: {' '.join(argv)} exited {done.returncode}:\n"
            f"{done.stdout[-1500:]}{done.stderr[-1500:]}"
        )
    try:
        return load.parse(done.stdout)
    except (ValueError, KeyError) as exc:
        raise LoadFailed(f"{load.name}: cannot read the output ({exc}):\n{done.stdout}") from exc


# --- iperf3 ------------------------------------------------------------------


def _iperf_argv(streams: int, reverse: bool) -> Callable[[int, float], list[str]]:
    def argv(port: int, seconds: float) -> list[str]:
        cmd = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{max(1, round(seconds))}"]
        cmd += ["-P", str(streams), "-J", "--connect-timeout", "3000"]
        if reverse:
            cmd.append("-R")
        return cmd

    return argv


def parse_iperf3(output: str) -> Metrics:
    """Receiver-side throughput in Gbit/s from ``iperf3 -J`` output."""
    doc = json.loads(output)
    if "error" in doc:
        raise ValueError(doc["error"])
    received = doc["end"]["sum_received"]
    return {"gbit_s": float(received["bits_per_second"]) / 1e9, "bytes": float(received["bytes"])}


_GBITS = Metric("gbit_s", "Gbit/s", True)

# --- wrk ---------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_P99 = re.compile(r"^\s*99(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_wrk(output: str) -> Metrics:
    """Requests/s, p99 latency (ms) and error counts from ``wrk --latency``.

    wrk counts a read error when the peer closes a connection it expected to
    keep; with ``Connection: close`` every response ends that way, so read
    errors are reported but are not a failure of the path.
    """
    rps = _RPS.search(output)
    p99 = _P99.search(output)
    total = _REQUESTS.search(output)
    if rps is None or p99 is None or total is None:
        raise ValueError("no Requests/sec, 99% or request count line")
    errors = _SOCKET_ERRORS.search(output)
    connect, read, write, timeout = (int(g) for g in errors.groups()) if errors else (0, 0, 0, 0)
    non_2xx = _NON_2XX.search(output)
    return {
        "rps": float(rps.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
        "requests": float(total.group(1)),
        "connect_errors": float(connect),
        "read_errors": float(read),
        "write_errors": float(write),
        "timeouts": float(timeout),
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
    }


def _wrk_argv(close: bool) -> Callable[[int, float], list[str]]:
    def argv(port: int, seconds: float) -> list[str]:
        cmd = ["wrk", "--latency", "-c", str(WRK_CONNECTIONS), "-t", str(WRK_THREADS)]
        cmd += ["-d", f"{max(1, round(seconds))}s", "--timeout", "5s"]
        if close:
            cmd += ["-H", "Connection: close"]
        return [*cmd, f"http://{LOOPBACK}:{port}/"]

    return argv


_P99_MS = Metric("p99_ms", "p99 ms", False)

LOADS: dict[str, Load] = {
    load.name: load
    for load in (
        Load(
            "iperf-1",
            "iperf",
            "iperf3 bulk throughput, 1 stream, client to server",
            (_GBITS,),
            _iperf_argv(1, reverse=False),
            parse_iperf3,
        ),
        Load(
            "iperf-4",
            "iperf",
            "iperf3 bulk throughput, 4 parallel streams (-P 4)",
            (_GBITS,),
            _iperf_argv(4, reverse=False),
            parse_iperf3,
        ),
        Load(
            "iperf-1-reverse",
            "iperf",
            "iperf3 bulk throughput, 1 stream, server to client (-R)",
            (_GBITS,),
            _iperf_argv(1, reverse=True),
            parse_iperf3,
        ),
        Load(
            "wrk-keepalive",
            "http",
            f"wrk, {WRK_CONNECTIONS} keepalive connections, small 200 responses",
            (Metric("rps", "req/s", True), _P99_MS),
            _wrk_argv(close=False),
            parse_wrk,
        ),
        Load(
            "wrk-close",
            "http",
            f"wrk with Connection: close, {WRK_CONNECTIONS} at a time: one connection per request",
            (Metric("rps", "conn/s", True), _P99_MS),
            _wrk_argv(close=True),
            parse_wrk,
        ),
    )
}

DEFAULT_LOADS = ("iperf-1", "iperf-4", "wrk-keepalive", "wrk-close")
