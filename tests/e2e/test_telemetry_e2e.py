"""OpenTelemetry end to end: a real ``l4gw run`` exporting to a real OTLP receiver.

A known set of connections goes through the gateway (served, no route,
connect failure, PROXY v2 with a traceparent in and out); the receiver
decodes what the exporter sent over HTTP/protobuf or gRPC and the test
compares spans, events, byte counts, status and metrics with what happened.
"""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway import proxy_protocol

from backends import CONCURRENT, HEADER, ScriptedBackend, recv_all
from entrypoints import plugin_env
from gwproc import free_port
from otlp_receiver import SPAN_KIND_CLIENT, SPAN_KIND_SERVER, STATUS_ERROR, OTLPReceiver, Span
from relay_helpers import payload

pytestmark = pytest.mark.timeout(60)


def otel_env(endpoint: str, protocol: str = "http/protobuf", **extra: str) -> dict[str, str]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": "l4gw-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    # The test process's own settings must not leak into the gateway's.
    for key in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        env[key] = ""
    env.update(extra)
    return env


def config(ports: dict[str, int], backend: int, dead: int, extra: str = "") -> str:
    return f"""
[gateway]
drain_timeout = "2s"

[[listener]]
name = "public"
bind = "127.0.0.1:{ports["public"]}"

[[listener]]
name = "nowhere"
bind = "127.0.0.1:{ports["nowhere"]}"

[[listener]]
name = "dead"
bind = "127.0.0.1:{ports["dead"]}"

[[listener]]
name = "guarded"
bind = "127.0.0.1:{ports["guarded"]}"

[[route]]
name = "api"
listener = "public"
cluster = "api"

[[route]]
name = "gone"
listener = "dead"
cluster = "gone"

[[route]]
name = "guarded"
listener = "guarded"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{backend}"]
connect_timeout = "2s"

[cluster.gone]
endpoints = ["127.0.0.1:{dead}"]
connect_timeout = "1s"
connect_attempts = 1

[telemetry]
exporter = "otlp"
sample_ratio = 1.0
{extra}
"""


def closed_port() -> int:
    """A loopback port nothing listens on (connects are refused)."""
    return free_port()


async def exchange(port: int, send: int, reply: int, seed: int) -> tuple[int, bytes]:
    """A scripted exchange through the gateway; returns (client port, reply)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    local_port = stream.socket.getsockname()[1]
    async with stream:
        await stream.send_all(HEADER.pack(reply, seed, CONCURRENT) + payload(send, seed))
        await stream.send_eof()
        got = await recv_all(stream)
    return local_port, got


async def refused_connection(port: int) -> int:
    """Connect and read until the gateway closes; returns the client port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    local_port = stream.socket.getsockname()[1]
    async with stream:
        try:
            assert await recv_all(stream) == b""
        except trio.BrokenResourceError:
            pass  # a reset is also a refusal
    return local_port


def server_spans(receiver: OTLPReceiver) -> list[Span]:
    return [s for s in receiver.spans() if s.kind == SPAN_KIND_SERVER]


def by_client_port(spans: list[Span], port: int, server_port: int | None = None) -> Span:
    """The one span of the connection from ``port`` (to ``server_port``: the kernel
    reuses an ephemeral port for connections to different destinations)."""
    found = [
        s
        for s in spans
        if s.attributes.get("client.port") == port
        and server_port in (None, s.attributes.get("server.port"))
    ]
    assert len(found) == 1, f"{len(found)} server spans for client port {port}"
    return found[0]


def children(receiver: OTLPReceiver, parent: Span) -> list[Span]:
    return sorted(
        (s for s in receiver.spans() if s.parent_span_id == parent.span_id),
        key=lambda s: s.start_ns,
    )


def event_names(span: Span) -> list[str]:
    return [name for name, _, _ in sorted(span.events, key=lambda e: e[2])]


def check_event_times(span: Span) -> None:
    for name, _, t in span.events:
        assert span.start_ns <= t <= span.end_ns, f"event {name} outside its span"


def point_value(receiver: OTLPReceiver, metric: str, attrs: dict[str, Any] | None = None) -> float:
    """Sum (or histogram count) of the points of ``metric`` whose attributes include ``attrs``."""
    total = 0.0
    for p in receiver.latest_points(metric):
        if all(p.attributes.get(k) == v for k, v in (attrs or {}).items()):
            total += p.count if p.count else p.value
    return total


async def test_spans_and_metrics_over_http(receiver, nursery, gateway, tmp_path):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "guarded")}
    dead = closed_port()
    gateway(
        config(ports, bport, dead),
        env=otel_env(
            receiver.http_endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="300",
            **plugin_env(tmp_path, "tagger", "l4gw_test_tagger"),
        ),
    )

    plan = [(1000, 2000, 1), (0, 5, 2), (70000, 0, 3)]
    served = {}
    for send, reply, seed in plan:
        client_port, got = await exchange(ports["public"], send, reply, seed)
        assert got == payload(reply, seed + 1)
        served[client_port] = (send, reply)
    no_route = await refused_connection(ports["nowhere"])
    failed = await refused_connection(ports["dead"])
    guarded = await refused_connection(ports["guarded"])

    spans = await trio.to_thread.run_sync(
        lambda: receiver.wait(
            lambda: len(server_spans(receiver)) >= 6 and server_spans(receiver),
            what="6 server spans",
        )
    )
    assert len(spans) == 6, [s.attributes for s in spans]
    for span in spans:
        # What a plugin adds through the flow lands on the span, cleaned up.
        a = span.attributes
        assert a["tagger.listener"] == a["l4gw.listener"].upper()
        assert a["tagger.object"] == "opaque-value"
        assert "tagger.nothing" not in a
        events = {name: attrs for name, attrs, _ in span.events}
        assert events["tagger.seen"] == {"tags": ("a", "b"), "count": 2}

    for client_port, (send, reply) in served.items():
        span = by_client_port(spans, client_port, ports["public"])
        a = span.attributes
        assert span.name == "tcp proxy"
        assert span.resource["service.name"] == "l4gw-test"
        assert span.scope == "l4gw"
        assert a["client.address"] == "127.0.0.1"
        assert a["server.address"] == "127.0.0.1"
        assert a["server.port"] == ports["public"]
        assert a["network.transport"] == "tcp"
        assert a["network.type"] == "ipv4"
        assert a["network.local.port"] == ports["public"]
        assert a["l4gw.listener"] == "public"
        assert a["l4gw.route"] == "api"
        assert a["l4gw.cluster"] == "api"
        assert a["l4gw.endpoint"] == f"127.0.0.1:{bport}"
        assert a["l4gw.bytes.from_client"] == HEADER.size + send
        assert a["l4gw.bytes.to_client"] == reply
        assert a["l4gw.close_reason"] in ("client_eof", "backend_eof")
        assert a["l4gw.spliced"] is False
        assert a["l4gw.tier"] == "copy"
        assert "error.type" not in a
        assert span.status_code != STATUS_ERROR
        names = event_names(span)
        assert names[-2:] == ["half_closed", "closed"]  # one side's FIN, then the end
        assert names[:-2] == ["tagger.seen", "admitted", "routed", "connect_attempt"]
        check_event_times(span)
        (attempt,) = children(receiver, span)
        assert attempt.kind == SPAN_KIND_CLIENT
        assert attempt.trace_id == span.trace_id
        assert attempt.name == "tcp connect api"
        assert attempt.attributes["server.port"] == bport
        assert attempt.status_code != STATUS_ERROR
        assert span.start_ns <= attempt.start_ns <= attempt.end_ns <= span.end_ns

    span = by_client_port(spans, no_route, ports["nowhere"])
    assert span.attributes["l4gw.listener"] == "nowhere"
    assert span.attributes["l4gw.close_reason"] == "no_route"
    assert span.attributes["error.type"] == "no_route"
    assert span.attributes["l4gw.refused_by"] == "core"
    assert span.status_code == STATUS_ERROR
    assert "l4gw.route" not in span.attributes
    assert children(receiver, span) == []
    assert event_names(span) == ["tagger.seen", "admitted", "closed"]

    span = by_client_port(spans, guarded, ports["guarded"])
    assert span.attributes["l4gw.close_reason"] == "refused"
    assert span.attributes["l4gw.refused_by"] == "tagger"
    assert span.attributes["l4gw.refused_rule"] == "deny_all"
    assert span.attributes["error.type"] == "refused"
    assert span.status_code == STATUS_ERROR
    assert span.status_message == "guarded listener"
    assert event_names(span) == ["tagger.seen", "closed"]

    span = by_client_port(spans, failed, ports["dead"])
    assert span.attributes["l4gw.close_reason"] == "connect_failed"
    assert span.attributes["error.type"] == "connect_failed"
    assert span.attributes["l4gw.route"] == "gone"
    assert span.status_code == STATUS_ERROR
    assert "refused" in span.status_message.lower()
    (attempt,) = children(receiver, span)
    assert attempt.status_code == STATUS_ERROR
    assert attempt.attributes["server.port"] == dead
    assert attempt.attributes["error.type"] == "connect_failed"
    events = {name: attrs for name, attrs, _ in span.events}
    assert "refused" in events["connect_attempt"]["error"].lower()

    # Metrics: cumulative, so the latest export holds the totals.
    def totals_arrived() -> bool:
        return point_value(receiver, "l4gw.connection.closed") == 6

    await trio.to_thread.run_sync(lambda: receiver.wait(totals_arrived, what="closed == 6"))
    assert point_value(receiver, "l4gw.connection.closed", {"l4gw.listener": "public"}) == 3
    assert point_value(receiver, "l4gw.connection.closed", {"l4gw.close_reason": "no_route"}) == 1
    assert (
        point_value(receiver, "l4gw.connection.closed", {"l4gw.close_reason": "connect_failed"})
        == 1
    )
    assert point_value(receiver, "l4gw.connection.active", {"l4gw.listener": "public"}) == 0
    assert point_value(receiver, "l4gw.connection.duration", {"l4gw.listener": "public"}) == 3
    received = sum(HEADER.size + send for send, _ in served.values())
    sent = sum(reply for _, reply in served.values())
    io = "l4gw.io"
    assert point_value(
        receiver, io, {"l4gw.listener": "public", "network.io.direction": "receive"}
    ) == (received)
    assert point_value(
        receiver, io, {"l4gw.listener": "public", "network.io.direction": "transmit"}
    ) == (sent)
    connect = "l4gw.upstream.connect.duration"
    assert point_value(receiver, connect, {"l4gw.cluster": "api"}) == 3
    failures = [p for p in receiver.latest_points(connect) if p.attributes.get("error.type")]
    assert [(p.attributes["l4gw.cluster"], p.count) for p in failures] == [("gone", 1)]
    refused = receiver.latest_points("l4gw.connection.refused")
    assert sorted(
        (
            p.attributes["l4gw.refused_by"],
            p.attributes.get("l4gw.refused_rule"),  # absent without a rule, never ""
            p.attributes["l4gw.close_reason"],
            p.value,
        )
        for p in refused
    ) == [("core", None, "no_route", 1), ("tagger", "deny_all", "refused", 1)]


async def test_spans_and_metrics_over_grpc(receiver, nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "guarded")}
    gateway(
        config(ports, bport, closed_port(), extra='metrics_interval = "300ms"'),
        env=otel_env(receiver.grpc_endpoint, "grpc", OTEL_METRIC_EXPORT_INTERVAL=""),
    )
    client_port, got = await exchange(ports["public"], 4096, 100, 11)
    assert got == payload(100, 12)
    no_route = await refused_connection(ports["nowhere"])

    spans = await trio.to_thread.run_sync(
        lambda: receiver.wait(
            lambda: len(server_spans(receiver)) >= 2 and server_spans(receiver), what="2 spans"
        )
    )
    ok = by_client_port(spans, client_port, ports["public"])
    assert ok.attributes["l4gw.bytes.from_client"] == HEADER.size + 4096
    assert ok.attributes["l4gw.bytes.to_client"] == 100
    assert ok.resource["service.name"] == "l4gw-test"
    assert len(children(receiver, ok)) == 1
    assert by_client_port(spans, no_route, ports["nowhere"]).status_code == STATUS_ERROR
    await trio.to_thread.run_sync(
        lambda: receiver.wait(
            lambda: point_value(receiver, "l4gw.connection.closed") == 2, what="metrics over gRPC"
        )
    )
    assert receiver.grpc_calls > 0
    assert receiver.http_posts == 0


class ProxyBackend:
    """Reads the PROXY v2 header the gateway sends, records it, answers "ok"."""

    def __init__(self) -> None:
        self.headers: list[proxy_protocol.ProxyHeader] = []

    async def serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while True:
                result = proxy_protocol.parse(data)
                if isinstance(result, proxy_protocol.ProxyHeader):
                    break
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            self.headers.append(result)
            await stream.send_all(b"ok")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.serve, listeners)


async def test_traceparent_in_and_out_of_proxy_v2(receiver, nursery, gateway):
    backend = ProxyBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gateway(
        f"""
[gateway]
drain_timeout = "2s"

[[listener]]
name = "pp"
bind = "127.0.0.1:{port}"
proxy_protocol = true
proxy_protocol_trusted = ["127.0.0.0/8"]

[[route]]
listener = "pp"
cluster = "traced"

[cluster.traced]
endpoints = ["127.0.0.1:{bport}"]
proxy_protocol = "v2"

[telemetry]
exporter = "otlp"
""",
        env=otel_env(receiver.http_endpoint),
    )
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    incoming = f"00-{trace_id}-{parent_id}-01"

    async def through(source: tuple[str, int], traceparent: str | None) -> None:
        tlvs = [(proxy_protocol.PP2_TYPE_TRACEPARENT, traceparent.encode())] if traceparent else []
        header = proxy_protocol.encode_v2(source, ("127.0.0.1", port), tlvs=tlvs)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(header)
            assert await recv_all(stream) == b"ok"

    await through(("198.18.0.10", 5555), incoming)
    await through(("198.18.0.11", 6666), None)

    spans = await trio.to_thread.run_sync(
        lambda: receiver.wait(
            lambda: len(server_spans(receiver)) >= 2 and server_spans(receiver), what="2 spans"
        )
    )
    continued = by_client_port(spans, 5555)
    assert continued.attributes["client.address"] == "198.18.0.10"
    assert continued.trace_id == trace_id
    assert continued.parent_span_id == parent_id
    fresh = by_client_port(spans, 6666)
    assert fresh.trace_id != trace_id
    assert fresh.parent_span_id == ""

    # Each backend header carries a traceparent whose parent is the gateway's
    # successful connect span of that connection.
    assert len(backend.headers) == 2
    for span, client in ((continued, ("198.18.0.10", 5555)), (fresh, ("198.18.0.11", 6666))):
        (header,) = [h for h in backend.headers if h.source == client]
        (attempt,) = children(receiver, span)
        assert header.traceparent == f"00-{span.trace_id}-{attempt.span_id}-01"


async def test_collector_down_keeps_serving_and_counts_drops(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "guarded")}
    admin = free_port()
    gw = gateway(
        config(ports, bport, closed_port()) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n',
        env=otel_env(
            f"http://127.0.0.1:{closed_port()}",
            OTEL_EXPORTER_OTLP_TIMEOUT="1",
            OTEL_BSP_MAX_QUEUE_SIZE="8",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
            OTEL_BSP_SCHEDULE_DELAY="50",
        ),
    )

    async def one(seed: int) -> None:
        _, got = await exchange(ports["public"], 2000, 3000, seed)
        assert got == payload(3000, seed + 1)

    for batch in range(5):
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(one, 100 + batch * 8 + i)
    assert backend.connections == 40

    def dropped() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "l4gw_telemetry_spans_dropped":
                return sum(s.value for s in family.samples if s.name.endswith("_total"))
        return 0.0

    deadline = trio.current_time() + 20
    while (value := await trio.to_thread.run_sync(dropped)) < 1:
        assert trio.current_time() < deadline, "no dropped spans counted"
        await trio.sleep(0.1)
    assert value >= 1
    log = gw.wait_log(r"spans dropped")
    # One warning however many batches failed (rate-limited), none of the
    # exporter's per-batch lines.
    assert len(re.findall(r"spans dropped since the last warning", log)) == 1
    assert not re.search(r" (WARNING|ERROR) opentelemetry\.", log), log
    # Still serving, and a prompt exit: the failing exporter is cut short.
    await one(999)
    assert gw.stop(timeout=10) == 0


def test_disabled_telemetry_loads_no_sdk():
    """exporter = "none" without an admin endpoint: setup returns None, no SDK imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gateway.telemetry import providers as telemetry\n"
        "from gateway.config import TelemetryConfig\n"
        "assert telemetry.setup(TelemetryConfig('none', 1.0, 'x', 10.0), prometheus=False,"
        " env={}) is None\n"
        # The specification's switch wins over the file.
        "assert telemetry.setup(TelemetryConfig('otlp', 1.0, 'x', 10.0), prometheus=False,"
        " env={'OTEL_SDK_DISABLED': 'True'}) is None\n"
        "import l4gw_plugins.telemetry as p\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')], 'SDK loaded'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


async def test_reload_changes_sample_ratio(receiver, nursery, gateway):
    """SIGHUP with a new ``sample_ratio``: the connections after it are sampled by it;
    keys that need a restart are named in a warning."""
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "guarded")}
    dead = closed_port()
    text = config(ports, bport, dead)
    gw = gateway(
        text.replace("sample_ratio = 1.0", "sample_ratio = 0.0"),
        env=otel_env(receiver.http_endpoint),
    )
    with trio.fail_after(40):
        before = [(await exchange(ports["public"], 100, 100, seed))[0] for seed in (1, 2, 3)]
        gw.write_config(text + 'service_name = "renamed"\n')
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(gw.wait_log, "reloaded")
        after = [(await exchange(ports["public"], 100, 100, seed))[0] for seed in (4, 5, 6)]
        while len(server_spans(receiver)) < len(after):
            await trio.sleep(0.05)
    # Spans leave in connection order: the earlier ones would have arrived by now.
    assert sorted(s.attributes["client.port"] for s in server_spans(receiver)) == sorted(after)
    assert not set(before) & set(after)
    # And each sampled connection's connect attempt, nothing else.
    parents = {s.span_id for s in server_spans(receiver)}
    assert (
        sorted(s.parent_span_id in parents for s in receiver.spans() if s.kind == SPAN_KIND_CLIENT)
        == [True] * 3
    )
    assert "telemetry: sample_ratio 1.0 from now on" in gw.log
    assert "changes to [telemetry] service_name take effect at the next restart" in gw.log


def exporter_pid(log: str) -> int:
    match = re.search(r"exporter pid (\d+)", log)
    assert match, log
    return int(match.group(1))


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def wait_gone(pid: int, seconds: float) -> None:
    deadline = trio.current_time() + seconds
    while process_alive(pid):
        assert trio.current_time() < deadline, f"exporter {pid} still running"
        await trio.sleep(0.05)


async def test_console_exporter_prints_spans(nursery, gateway):
    """``exporter = "console"`` (what ``l4gw demo --telemetry console`` uses)."""
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(
        f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]

[telemetry]
exporter = "console"
""",
        env={"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_EXPORTER": "", "OTEL_SERVICE_NAME": ""},
    )
    client_port, got = await exchange(port, 10, 20, 5)
    assert got == payload(20, 6)
    log = await trio.to_thread.run_sync(lambda: gw.wait_log(r'"name": "tcp proxy"', 15))
    assert f'"client.port": {client_port}' in log
    assert '"name": "tcp connect api"' in log
    assert gw.stop(timeout=10) == 0
    await wait_gone(exporter_pid(log), 5)


async def test_exporter_process_ends_with_the_gateway(receiver, nursery, gateway):
    """Stopped: the exporter delivers the last spans and exits. Killed: it exits too."""
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ports = {name: free_port() for name in ("public", "nowhere", "dead", "guarded")}
    text = config(ports, bport, closed_port())
    # A long schedule delay: only the final flush can deliver the span in time.
    gw = gateway(text, env=otel_env(receiver.http_endpoint, OTEL_BSP_SCHEDULE_DELAY="60000"))
    pid = exporter_pid(gw.log)
    assert process_alive(pid)
    client_port, _ = await exchange(ports["public"], 10, 10, 1)
    assert gw.stop(timeout=10) == 0
    await wait_gone(pid, 5)
    by_client_port(server_spans(receiver), client_port)

    killed = gateway(text, name="killed", env=otel_env(receiver.http_endpoint))
    pid = exporter_pid(killed.log)
    assert killed.proc is not None
    killed.proc.kill()
    killed.proc.wait()
    await wait_gone(pid, 10)
