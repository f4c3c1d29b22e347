"""Plugins inside the connection's trace: a plugin installed by entry point uses the
standard OpenTelemetry API in its hooks (tests/testplugins/l4gw_test_spans.py), and a
real ``l4gw run`` exports to a real OTLP receiver.

The span the plugin starts in ``l4gw_admit`` is a child of the connection's SERVER
span, in its trace; what it sets on ``trace.get_current_span()`` is on the SERVER
span. A context variable it leaves set in one connection is not set in the next, which
a task kept from the first may serve (gateway/taskpool.py).
"""

from __future__ import annotations

import pytest
import trio

from backends import CONCURRENT, HEADER, ScriptedBackend, recv_all
from entrypoints import plugin_env
from gwproc import free_port
from otlp_receiver import SPAN_KIND_SERVER
from relay_helpers import payload

pytestmark = pytest.mark.timeout(60)


async def test_plugin_span_is_a_child_of_the_connection_span(receiver, nursery, gateway, tmp_path):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "",
        "OTEL_TRACES_EXPORTER": "",
        "OTEL_METRICS_EXPORTER": "none",
        **plugin_env(tmp_path, "spans", "l4gw_test_spans"),
    }
    gateway(
        f"""
[gateway]
drain_timeout = "2s"
workers = 2

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
name = "api"
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]

[telemetry]
exporter = "otlp"
sample_ratio = 1.0
""",
        env=env,
    )
    ports = []
    for seed in (1, 2, 3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ports.append(stream.socket.getsockname()[1])
        async with stream:
            await stream.send_all(HEADER.pack(100, seed, CONCURRENT) + payload(10, seed))
            await stream.send_eof()
            assert await recv_all(stream) == payload(100, seed + 1)

    def arrived() -> bool:
        spans = receiver.spans()
        servers = [s for s in spans if s.kind == SPAN_KIND_SERVER]
        lookups = [s for s in spans if s.name == "spans.lookup"]
        return len(servers) >= 3 and len(lookups) >= 3

    await trio.to_thread.run_sync(lambda: receiver.wait(arrived, what="3 connections' spans"))
    spans = receiver.spans()
    servers = {s.attributes["client.port"]: s for s in spans if s.kind == SPAN_KIND_SERVER}
    lookups = {s.trace_id: s for s in spans if s.name == "spans.lookup"}
    assert sorted(servers) == sorted(ports)
    assert len(lookups) == 3
    for server in servers.values():
        flow_id = server.attributes["l4gw.flow.id"]
        # The plugin's own span: in the SERVER span's trace, its child.
        lookup = lookups[server.trace_id]
        assert lookup.attributes["spans.flow"] == flow_id
        assert lookup.parent_span_id == server.span_id
        assert server.start_ns <= lookup.start_ns <= lookup.end_ns <= server.end_ns
        # What it set on the current span is on the SERVER span.
        assert server.attributes["spans.admit_recording"] is True
        # Nothing the plugin left in the context of an earlier connection's task.
        assert server.attributes["spans.context_carried"] is False
        assert server.attributes["spans.route_trace"] == server.trace_id
        events = {name: attrs for name, attrs, _ in server.events}
        assert events["spans.admit"] == {"flow": flow_id}
