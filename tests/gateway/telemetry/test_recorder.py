"""gateway.telemetry.recorder: the recorder driven hook by hook, spans and metrics in memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from gateway import CloseReason, Endpoint, Flow
from gateway import config as config_mod
from gateway.config import TelemetryConfig
from gateway.telemetry import providers as tel
from gateway.telemetry import recorder as recorder_mod
from gateway.telemetry.recorder import FlowTelemetry, Recorder
from gateway.telemetry.stats import ExportStats

RAW = {
    "listener": [
        {"name": "public", "bind": "127.0.0.1:8080"},
        {"name": "dns", "bind": "127.0.0.1:5353", "protocol": "udp"},
    ],
    "route": [
        {"listener": "public", "cluster": "api"},
        {"listener": "dns", "cluster": "resolvers"},
    ],
    "cluster": {
        "api": {"endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"], "proxy_protocol": "v2"},
        "resolvers": {"endpoints": ["127.0.0.1:53"]},
    },
}

E1, E2 = Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)


@dataclass
class Rig:
    recorder: Recorder
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def server(self) -> ReadableSpan:
        (span,) = [s for s in self.finished() if s.kind is SpanKind.SERVER]
        return span

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.recorder.telemetry.inject(self.metrics.get_metrics_data())
        out = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        for p in m.data.data_points:
                            value = getattr(p, "value", None)
                            out.append(
                                (dict(p.attributes or {}), value if value is not None else p.count)
                            )
        return out


def rig(ratio: float = 1.0, fast: bool = False) -> Rig:
    """``fast``: the recorder decides the file's ratio itself (no OTEL_TRACES_SAMPLER);
    otherwise it asks the SDK's sampler, as with OTEL_TRACES_SAMPLER set."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(ratio)), shutdown_on_exit=False
    )
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    processor = SimpleSpanProcessor(spans)
    tracer_provider.add_span_processor(processor)
    telemetry = tel.Telemetry(
        TelemetryConfig("console", ratio, "test", 10.0),
        "console",
        "none",
        tracer_provider.get_tracer("l4gw"),
        meter_provider.get_meter("l4gw"),
        ExportStats(),
        tracer_provider,
        meter_provider,
        span_processor=processor,
        sample_ratio=ratio if fast else None,
    )
    config = config_mod.from_dict(RAW, "<test>", {})
    return Rig(Recorder(telemetry, config), spans, reader)


@pytest.fixture
def r() -> Iterator[Rig]:
    made = rig()
    yield made
    made.recorder.unsubscribe()  # from the process's discovery registry


def tcp_flow(id: int = 1) -> Flow:
    return Flow(id, "public", "tcp", ("198.18.0.1", 40000), ("198.18.1.1", 443))


def close(rec: Recorder, flow: Flow, reason: str) -> None:
    flow.close_reason = reason
    flow.ended = time.time()
    rec.closed(flow)


def test_served_connection(r):
    flow = tcp_flow()
    r.recorder.opened(flow)
    assert flow.trace_id is not None and len(flow.trace_id) == 32
    r.recorder.admitted(flow)
    flow.sni, flow.alpn = "api.example", ("h2", "http/1.1")
    flow.add_event("peeked", sni="api.example", alpn="h2,http/1.1")
    flow.route, flow.cluster = "route0", "api"
    flow.add_event("routed", route="route0", cluster="api")
    r.recorder.connect_attempt(flow, E1, "Connection refused", 0.002)
    assert flow.traceparent_out is None
    r.recorder.connect_attempt(flow, E2, None, 0.001)
    flow.endpoint, flow.tier = str(E2), "copy"
    flow.set_attribute("myplugin.user", "alice")
    flow.set_attribute("myplugin.weird", object())
    flow.set_attribute("myplugin.nothing", None)
    flow.add_event("myplugin.checked", n=3, tags=["a", "b"], skip=None)
    flow.bytes_from_client, flow.bytes_to_client = 1234, 5678
    close(r.recorder, flow, CloseReason.BACKEND_EOF)

    server = r.server()
    a = dict(server.attributes or {})
    assert server.name == "tcp proxy"
    assert a["client.address"] == "198.18.0.1" and a["client.port"] == 40000
    # The SNI is server.address (semantic conventions v1.44.0 deprecate
    # tls.client.server_name for it); the destination connected to is the local address.
    assert a["server.address"] == "api.example" and a["server.port"] == 443
    assert a["network.local.address"] == "198.18.1.1" and a["network.local.port"] == 443
    assert "tls.client.server_name" not in a
    assert a["network.transport"] == "tcp" and a["network.type"] == "ipv4"
    assert a["l4gw.route"] == "route0" and a["l4gw.cluster"] == "api"
    assert a["l4gw.endpoint"] == "127.0.0.1:9002"
    assert a["l4gw.bytes.from_client"] == 1234 and a["l4gw.bytes.to_client"] == 5678
    assert a["l4gw.close_reason"] == "backend_eof"
    assert a["l4gw.spliced"] is False and a["l4gw.tier"] == "copy"
    assert a["l4gw.alpn"] == ("h2", "http/1.1")
    assert a["myplugin.user"] == "alice"
    assert a["myplugin.weird"].startswith("<object object")
    assert "myplugin.nothing" not in a
    assert server.status.status_code is StatusCode.UNSET
    assert format(server.context.trace_id, "032x") == flow.trace_id
    # Events in time order, each at its own time.
    names = [e.name for e in sorted(server.events, key=lambda e: e.timestamp)]
    assert names == [
        "admitted",
        "peeked",
        "routed",
        "connect_attempt",
        "connect_attempt",
        "myplugin.checked",
        "closed",
    ]
    assert [e.name for e in server.events] == names
    checked = next(e for e in server.events if e.name == "myplugin.checked")
    assert dict(checked.attributes or {}) == {"n": 3, "tags": ("a", "b")}
    assert server.start_time == int(flow.started * 1e9)
    assert all(server.start_time <= e.timestamp <= server.end_time for e in server.events)

    attempts = sorted(
        (s for s in r.finished() if s.kind is SpanKind.CLIENT), key=lambda s: s.start_time
    )
    assert [s.name for s in attempts] == ["tcp connect api", "tcp connect api"]
    assert all(
        s.parent is not None and s.parent.span_id == server.context.span_id for s in attempts
    )
    failed, ok = attempts
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "connect_failed"
    assert failed.attributes["server.port"] == 9001
    assert ok.status.status_code is StatusCode.UNSET
    # Back-dated by the attempt's duration.
    assert ok.end_time - ok.start_time == pytest.approx(1e6, abs=2)
    # The backend's traceparent: the successful attempt, sampled.
    assert flow.traceparent_out == (f"00-{ok.context.trace_id:032x}-{ok.context.span_id:016x}-01")

    closed = r.points("l4gw.connection.closed")
    routed = {
        "l4gw.listener": "public",
        "network.transport": "tcp",
        "l4gw.route": "route0",
        "l4gw.cluster": "api",
    }
    assert closed == [({**routed, "l4gw.close_reason": "backend_eof"}, 1)]
    assert r.points("l4gw.connection.active") == [(routed, 0)]
    io = {attrs["network.io.direction"]: v for attrs, v in r.points("l4gw.io")}
    assert io == {"receive": 1234, "transmit": 5678}
    assert all(a["l4gw.route"] == "route0" and a["l4gw.cluster"] == "api" for a, _ in r.points("l4gw.io"))
    connects = {
        (a["l4gw.endpoint"], a.get("error.type")): n
        for a, n in r.points("l4gw.upstream.connect.duration")
    }
    assert connects == {("127.0.0.1:9001", "connect_failed"): 1, ("127.0.0.1:9002", None): 1}
    # A successful connect has no error.type at all (it used to be exported as "null").
    ok_point = next(a for a, _ in r.points("l4gw.upstream.connect.duration") if "error.type" not in a)
    assert None not in ok_point.values() and "null" not in ok_point.values()
    assert r.points("l4gw.connection.refused") == []


def test_io_counts_open_flows_live(r):
    flow = tcp_flow()
    r.recorder.opened(flow)
    flow.bytes_from_client, flow.bytes_to_client = 10, 20
    io = {attrs["network.io.direction"]: v for attrs, v in r.points("l4gw.io")}
    assert io == {"receive": 10, "transmit": 20}
    assert r.points("l4gw.connection.active")[0][1] == 1
    flow.bytes_from_client = 15
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    io = {attrs["network.io.direction"]: v for attrs, v in r.points("l4gw.io")}
    assert io == {"receive": 15, "transmit": 20}


def test_refused_by_plugin_is_an_error_with_its_rule(r):
    flow = tcp_flow()
    r.recorder.opened(flow)
    flow.refused_by, flow.refused_rule, flow.error = "ratelimit", "per_client", "too fast"
    close(r.recorder, flow, CloseReason.REFUSED)
    server = r.server()
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == "too fast"
    a = server.attributes
    assert (a["error.type"], a["l4gw.refused_by"], a["l4gw.refused_rule"]) == (
        "refused",
        "ratelimit",
        "per_client",
    )
    assert [e.name for e in server.events] == ["closed"]
    (refused,) = r.points("l4gw.connection.refused")
    assert refused[0]["l4gw.refused_by"] == "ratelimit"
    assert refused[0]["l4gw.refused_rule"] == "per_client"


def test_unrouted_refusal_has_no_empty_or_null_attribute(r):
    """Refused before routing, without a rule: route, cluster and rule are absent."""
    flow = tcp_flow()
    r.recorder.opened(flow)
    flow.refused_by = "core"
    close(r.recorder, flow, CloseReason.NO_ROUTE)
    for name in ("l4gw.connection.refused", "l4gw.connection.closed", "l4gw.io"):
        for attrs, _ in r.points(name):
            assert "l4gw.route" not in attrs and "l4gw.cluster" not in attrs, (name, attrs)
            assert all(v not in (None, "", "null", "None") for v in attrs.values()), (name, attrs)
    ((refused, n),) = r.points("l4gw.connection.refused")
    assert n == 1 and refused["l4gw.refused_by"] == "core" and "l4gw.refused_rule" not in refused


def test_endpoint_labels_are_capped_per_cluster(r):
    """Past ENDPOINTS_PER_CLUSTER endpoints of one cluster, the rest share "other"."""
    cap = recorder_mod.ENDPOINTS_PER_CLUSTER
    flow = tcp_flow()
    flow.cluster = "api"
    for i in range(cap + 10):
        r.recorder.connect_attempt(flow, Endpoint("198.18.2.1", 1000 + i), None, 0.001)
    other = tcp_flow(2)
    other.cluster = "resolvers"
    r.recorder.connect_attempt(other, Endpoint("198.18.3.1", 53), None, 0.001)
    counts: dict[tuple[str, str], int] = {}
    for attrs, n in r.points("l4gw.upstream.connect.duration"):
        key = (attrs["l4gw.cluster"], attrs["l4gw.endpoint"])
        counts[key] = counts.get(key, 0) + n
    api = {e: n for (c, e), n in counts.items() if c == "api"}
    assert len(api) == cap + 1 and api["other"] == 10
    assert counts[("resolvers", "198.18.3.1:53")] == 1  # another cluster has its own cap


def test_endpoint_labels_follow_the_clusters_current_set(r):
    """An address that left the cluster's set (DNS, a file, a plugin) gives its label back:
    after churn, the live endpoints have their own labels, not "other"."""
    cap = recorder_mod.ENDPOINTS_PER_CLUSTER
    flow = tcp_flow()
    flow.cluster = "api"
    for i in range(cap):
        r.recorder.connect_attempt(flow, Endpoint("198.18.2.1", 1000 + i), None, 0.001)
    new = tuple(Endpoint("198.18.2.2", 2000 + i) for i in range(3))
    # What the discovery registry calls after a change of the cluster's set.
    r.recorder._endpoints_changed("api", new)
    for endpoint in new:
        r.recorder.connect_attempt(flow, endpoint, None, 0.001)
    labels = {a["l4gw.endpoint"] for a, _ in r.points("l4gw.upstream.connect.duration")}
    assert {"198.18.2.2:2000", "198.18.2.2:2001", "198.18.2.2:2002"} <= labels
    assert "other" not in labels


def test_incoming_traceparent_is_the_parent(r):
    flow = tcp_flow()
    flow.trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r.recorder.opened(flow)
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    server = r.server()
    assert flow.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert server.parent is not None and server.parent.is_remote
    assert server.parent.span_id == 0x00F067AA0BA902B7


def test_bad_incoming_traceparent_starts_a_new_trace(r):
    flow = tcp_flow()
    flow.trace_parent = "00-nothex-00f067aa0ba902b7-01"
    r.recorder.opened(flow)
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    assert r.server().parent is None


@pytest.mark.parametrize("fast", [False, True])
def test_unsampled_incoming_parent_is_respected(fast):
    r = rig(1.0, fast)
    flow = tcp_flow()
    flow.trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    r.recorder.opened(flow)
    flow.cluster = "api"
    r.recorder.connect_attempt(flow, E1, None, 0.001)
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    assert r.finished() == []
    assert flow.trace_id is None
    # Not sampled: propagated as such, so the backend does not sample either.
    assert flow.traceparent_out is not None
    assert flow.traceparent_out.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert flow.traceparent_out.endswith("-00")


@pytest.mark.parametrize("fast", [False, True])
def test_not_sampled_records_metrics_only(fast):
    r = rig(0.0, fast)
    flow = tcp_flow()
    r.recorder.opened(flow)
    r.recorder.admitted(flow)
    flow.cluster = "api"
    r.recorder.connect_attempt(flow, E1, None, 0.001)
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    assert r.finished() == []
    assert flow.trace_id is None
    assert r.points("l4gw.connection.closed")[0][1] == 1


def test_udp_session_and_spliced_flow(r):
    flow = Flow(7, "dns", "udp", ("198.18.0.1", 5000), ("198.18.1.1", 53))
    r.recorder.opened(flow)
    flow.cluster = "resolvers"
    r.recorder.connect_attempt(flow, Endpoint("127.0.0.1", 53), None, 0.0)
    assert flow.traceparent_out is None  # the cluster sends no PROXY v2 header
    flow.tier = "splice"
    close(r.recorder, flow, CloseReason.SESSION_IDLE)
    server = r.server()
    assert server.name == "udp proxy"
    assert server.attributes["network.transport"] == "udp"
    assert server.attributes["l4gw.spliced"] is True
    assert server.attributes["l4gw.tier"] == "splice"
    (attempt,) = [s for s in r.finished() if s.kind is SpanKind.CLIENT]
    assert attempt.name == "udp connect resolvers"
    assert r.points("l4gw.connection.spliced") == [
        (
            {
                "l4gw.listener": "dns",
                "network.transport": "udp",
                "l4gw.cluster": "resolvers",
                "l4gw.tier": "splice",
            },
            1,
        )
    ]


def test_closed_without_opened_still_gets_a_span(r):
    """A bad PROXY header ends the flow before the opened hook."""
    flow = tcp_flow()
    flow.error = "bad PROXY header: no PROXY protocol signature"
    close(r.recorder, flow, CloseReason.BAD_PROXY_HEADER)
    server = r.server()
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "bad_proxy_header"
    # Never opened: not counted as active, but counted as closed.
    assert r.points("l4gw.connection.active") == [
        ({"l4gw.listener": "public", "network.transport": "tcp"}, 0)
    ]
    assert r.points("l4gw.connection.closed")[0][1] == 1


def test_reload_updates_proxy_clusters(r):
    raw = {**RAW, "cluster": {**RAW["cluster"], "api": {"endpoints": ["127.0.0.1:9001"]}}}
    r.recorder.reconfigure(config_mod.from_dict(raw, "<test>", {}))
    flow = tcp_flow()
    r.recorder.opened(flow)
    flow.cluster = "api"
    r.recorder.connect_attempt(flow, E1, None, 0.001)
    assert flow.traceparent_out is None


def test_spans_encode_like_the_sdk(r):
    """The recorder's spans, through the fast encoder, read back as the SDK's encoding."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from gateway.telemetry.otlp import SpanEncoder

    flow = tcp_flow()
    flow.trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r.recorder.opened(flow)
    r.recorder.admitted(flow)
    flow.cluster = "api"
    flow.add_event("routed", route="route0", cluster="api")
    r.recorder.connect_attempt(flow, E1, "refused", 0.001)
    r.recorder.connect_attempt(flow, E2, None, 0.001)
    flow.set_attribute("p.list", [1, "a"])
    close(r.recorder, flow, CloseReason.BACKEND_EOF)
    spans = r.finished()
    assert len(spans) == 3
    got = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert got == encode_spans(spans)


@pytest.mark.parametrize("fast", [False, True])
def test_sampled_parent_is_followed_even_at_ratio_zero(fast):
    r = rig(0.0, fast)
    flow = tcp_flow()
    flow.trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r.recorder.opened(flow)
    close(r.recorder, flow, CloseReason.CLIENT_EOF)
    assert flow.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len(r.finished()) == 1


def test_ratio_samples_about_that_share():
    r = rig(0.25, fast=True)
    flows = [tcp_flow(i) for i in range(2000)]
    for flow in flows:
        r.recorder.opened(flow)
        close(r.recorder, flow, CloseReason.CLIENT_EOF)
    sampled = sum(f.trace_id is not None for f in flows)
    assert 350 < sampled < 650
    assert len(r.finished()) == sampled


# --- FlowTelemetry: set up once per process, reconfigured on reload ---------------------------


def with_telemetry(raw: dict[str, Any], **telemetry: Any) -> config_mod.Config:
    return config_mod.from_dict({**raw, "telemetry": telemetry}, "<test>", {})


def test_set_up_once_then_a_reload_applies_the_sample_ratio(caplog):
    made: list[tuple[TelemetryConfig, bool]] = []
    r = rig(1.0, fast=True)

    def setup(config: TelemetryConfig, *, prometheus: bool, **_: Any) -> tel.Telemetry:
        made.append((config, prometheus))
        return r.recorder.telemetry

    ft = FlowTelemetry(setup)
    assert ft.recorder is None
    ft.configure(with_telemetry(RAW, exporter="console", sample_ratio=1.0))
    assert ft.recorder is not None and made[0][0].sample_ratio == 1.0 and not made[0][1]
    recorder = ft.recorder
    with caplog.at_level("INFO", logger="l4gw.telemetry"):
        ft.configure(with_telemetry(RAW, exporter="console", sample_ratio=0.0))
    assert len(made) == 1 and ft.recorder is recorder
    assert recorder.telemetry.sample_ratio == 0.0
    assert "sample_ratio 0.0 from now on" in caplog.text
    flow = tcp_flow()
    recorder.opened(flow)
    close(recorder, flow, CloseReason.CLIENT_EOF)
    assert flow.trace_id is None  # sampled at the reloaded ratio


def test_keys_built_once_wait_for_a_restart(caplog):
    r = rig(1.0, fast=True)
    ft = FlowTelemetry(lambda *a, **k: r.recorder.telemetry)
    ft.configure(with_telemetry(RAW, exporter="console"))
    with caplog.at_level("WARNING", logger="l4gw.telemetry"):
        ft.configure(
            with_telemetry(
                {**RAW, "admin": {"bind": "127.0.0.1:0"}}, exporter="otlp", service_name="x"
            )
        )
    assert (
        "changes to [telemetry] exporter, [telemetry] service_name, [admin] on or off "
        "(/metrics) take effect at the next restart" in caplog.text
    )


def test_off_records_nothing_and_costs_no_recorder():
    calls: list[object] = []
    ft = FlowTelemetry(lambda *a, **k: calls.append(a) or None)
    ft.configure(with_telemetry(RAW, exporter="none"))
    ft.configure(with_telemetry(RAW, exporter="none", sample_ratio=0.5))
    assert ft.recorder is None and len(calls) == 1
    ft.shutdown()  # nothing to deliver
