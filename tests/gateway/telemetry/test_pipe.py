"""gateway/telemetry/pipe.py and gateway/telemetry/exporter.py: records to a real collector.

Real exporter processes (and the in-process thread fallback) on a real
socket pair, posting to the loopback OTLP receiver; kills are real signals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.telemetry import flows as tf
from gateway.telemetry import pipe as telemetry_pipe
from gateway.telemetry.pipe import ExporterPipe
from gateway.telemetry.stats import ExportStats

from gwproc import free_port
from otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.timeout(60)

SCOPE = ("l4gw", "1.0", "", None)


def settings(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "exporter": "otlp",
        "protocol": "http/protobuf",
        "resource": ({"service.name": "pipe-test"}, ""),
        "queue_size": 2048,
        "batch_size": 512,
        "delay": 0.05,
        "exit_timeout": 2.0,
        "log_level": 30,
        "nice": 0,
    }
    base.update(changes)
    return base


def attempt(i: int, error: str | None = None) -> tuple[Any, ...]:
    now = time.time_ns()
    record = (tf.ATTEMPT, "tcp", 1000 + i, 1 + i, 0x99, None, now - 1000, now, "api")
    return (*record, "127.0.0.1", 9001, "127.0.0.1:9001", error, SCOPE)


def flow(i: int, attempts: int = 1) -> tuple[Any, ...]:
    """A flow record with ``attempts`` connect attempts: 1 + ``attempts`` spans."""
    now = time.time_ns()
    r: list[Any] = [None] * tf.FLOW_FIELDS
    r[tf.F_TAG], r[tf.F_LISTENER], r[tf.F_TRANSPORT] = tf.FLOW, {}, "tcp"
    r[tf.F_TRACE_ID], r[tf.F_SPAN_ID], r[tf.F_PARENT_ID] = 5000 + i, 6000 + i, 0
    r[tf.F_START], r[tf.F_END] = now - 10_000, now
    r[tf.F_CLIENT], r[tf.F_DESTINATION] = ("127.0.0.1", 1000 + i), ("127.0.0.1", 2)
    r[tf.F_ID], r[tf.F_FROM_CLIENT], r[tf.F_TO_CLIENT] = i, 0, 0
    r[tf.F_REASON], r[tf.F_SPLICED] = "client_eof", False
    r[tf.F_ADMITTED], r[tf.F_SCOPE] = 0, SCOPE
    r[tf.F_ATTEMPTS] = [
        (now - 5_000, "127.0.0.1:9001", None, 1e-6, 0, "127.0.0.1", 9001, "api")
        for _ in range(attempts)
    ] or None
    return tuple(r)


def wait_for(
    condition: Callable[[], Any], pipe: ExporterPipe | None = None, timeout: float = 20
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if pipe is not None:
            pipe.poll()
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timeout waiting for {condition}"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    # The exporter (process or thread) reads the standard variables itself.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.http_endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def pipes() -> Iterator[Callable[..., ExporterPipe]]:
    started: list[ExporterPipe] = []

    def start(stats: ExportStats, mode: str = "process", **changes: Any) -> ExporterPipe:
        pipe = ExporterPipe(settings(**changes), stats, mode)
        pipe.start()
        started.append(pipe)
        return pipe

    yield start
    for pipe in started:
        pipe.close(5)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_records_reach_the_collector(receiver, pipes, mode):
    stats = ExportStats()
    pipe = pipes(stats, mode)
    if mode == "process":
        assert pipe.pid is not None and alive(pipe.pid)
    else:
        assert pipe.pid is None
    count = telemetry_pipe.BATCH + 44  # one full batch sent at once, the rest on flush
    for i in range(count):
        pipe.add(attempt(i, "refused" if i == 0 else None))
    pipe.flush()
    spans = wait_for(lambda: len(receiver.spans()) >= count and receiver.spans())
    assert len(spans) == count
    assert {s.name for s in spans} == {"tcp connect api"}
    assert all(s.resource["service.name"] == "pipe-test" for s in spans)
    (failed,) = [s for s in spans if s.attributes.get("error.type")]
    assert failed.status_message == "refused"
    wait_for(lambda: stats.spans_exported == count, pipe)
    # A flow record is its SERVER span and a CLIENT span per attempt, counted as such.
    for i in range(3):
        pipe.add(flow(i, attempts=2))
    pipe.flush()
    spans = wait_for(lambda: len(receiver.spans()) >= count + 9 and receiver.spans())
    servers = {s.span_id: s for s in spans if s.name == "tcp proxy"}
    children = [s for s in spans if s.parent_span_id in servers]
    assert len(children) == 6 and {s.name for s in children} == {"tcp connect api"}
    assert len({s.span_id for s in children}) == 6
    assert all(servers[s.parent_span_id].trace_id == s.trace_id for s in children)
    assert all(s.end_ns - s.start_ns == 1000 for s in children)  # 1e-6 s
    wait_for(lambda: stats.spans_exported == count + 9, pipe)
    assert pipe.close(5)
    assert stats.spans_dropped == 0


def test_a_plugin_value_marshal_refuses_is_cleaned(receiver, pipes):
    stats = ExportStats()
    pipe = pipes(stats)
    record = list(attempt(0))
    now = time.time_ns()
    flow = [None] * tf.FLOW_FIELDS
    flow[tf.F_TAG], flow[tf.F_LISTENER], flow[tf.F_TRANSPORT] = tf.FLOW, {}, "tcp"
    flow[tf.F_TRACE_ID], flow[tf.F_SPAN_ID], flow[tf.F_PARENT_ID] = 5, 6, 0
    flow[tf.F_START], flow[tf.F_END] = now - 10, now
    flow[tf.F_CLIENT], flow[tf.F_DESTINATION] = ("127.0.0.1", 1), ("127.0.0.1", 2)
    flow[tf.F_ID], flow[tf.F_FROM_CLIENT], flow[tf.F_TO_CLIENT] = 1, 0, 0
    flow[tf.F_REASON], flow[tf.F_SPLICED] = "client_eof", False
    flow[tf.F_ATTRIBUTES] = {"p.obj": object()}
    flow[tf.F_ADMITTED], flow[tf.F_SCOPE] = 0, SCOPE
    pipe.add(tuple(record))
    pipe.add(tuple(flow))
    pipe.flush()
    spans = wait_for(lambda: len(receiver.spans()) >= 2 and receiver.spans())
    (server,) = [s for s in spans if s.name == "tcp proxy"]
    assert server.attributes["p.obj"].startswith("<object object")


def test_queue_overflow_and_failed_exports_are_counted(pipes, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    stats = ExportStats(warn_interval=3600)
    pipe = pipes(stats, queue_size=8, batch_size=4)
    for i in range(100):
        pipe.add(attempt(i))
    pipe.flush()
    # 92 do not fit in the exporter's queue; the 8 that do fail to export.
    wait_for(lambda: stats.spans_dropped == 100, pipe)
    assert stats.spans_exported == 0
    assert stats.last_error
    started = time.monotonic()
    assert pipe.close(5)
    # The last export failed: the final flush does not wait for the collector again.
    assert time.monotonic() - started < 4


def test_an_exporter_that_dies_is_counted_then_restarted(receiver, pipes, monkeypatch, caplog):
    monkeypatch.setattr(telemetry_pipe, "RESTART_BACKOFF", (0.2,))
    stats = ExportStats(warn_interval=3600)
    pipe = pipes(stats, delay=30.0)  # records wait in the exporter's queue
    first = pipe.pid
    assert first is not None
    for i in range(10):
        pipe.add(flow(i, attempts=i % 3))  # 10 SERVER spans and 9 CLIENT spans
    pipe.flush()
    time.sleep(0.2)  # let the exporter take them off the socket before it dies
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: stats.spans_dropped == 19, pipe)
    assert "span exporter process exited" in caplog.text
    second = wait_for(lambda: pipe.pid not in (None, first) and pipe.pid, pipe)
    assert alive(second)
    for i in range(5):
        pipe.add(attempt(100 + i))
    pipe.request_flush()
    spans = wait_for(lambda: len(receiver.spans()) >= 5 and receiver.spans(), pipe)
    assert sorted(s.attributes["l4gw.endpoint"] for s in spans) == ["127.0.0.1:9001"] * 5
    assert pipe.close(5)
    assert stats.spans_dropped == 19


def test_the_exporter_ignores_ctrl_c_and_flushes_at_close(receiver, pipes):
    stats = ExportStats()
    pipe = pipes(stats, delay=30.0)
    assert pipe.pid is not None
    pid = pipe.pid
    for i in range(3):
        pipe.add(attempt(i))
    pipe.flush()
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    time.sleep(0.3)
    assert alive(pid)
    # End of file: the exporter exports what it holds and exits.
    assert pipe.close(5)
    assert len(receiver.spans()) == 3
    assert not alive(pid)
    assert stats.spans_exported == 3


PARENT = """
import sys, time
from gateway.telemetry.stats import ExportStats
from gateway.telemetry.pipe import ExporterPipe
settings = {settings!r}
pipe = ExporterPipe(settings, ExportStats())
pipe.start()
print(pipe.pid, flush=True)
time.sleep(60)
"""


def test_the_exporter_exits_when_the_gateway_is_killed(receiver):
    code = PARENT.format(settings=settings(exit_timeout=1.0))
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert alive(pid)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(pid), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
