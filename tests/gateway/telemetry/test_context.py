"""gateway.telemetry.context: the connection's span is the current span during its hooks.

The core's own drivers (gateway.testing.run_decisions, close_flow) run the
built-in telemetry plugin and a probe plugin that uses only the OpenTelemetry
API; the spans come out of the SDK's in-memory exporter.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from gateway import Flow, hookimpl
from gateway.config import TelemetryConfig
from gateway.telemetry import providers as tel
from gateway.telemetry.context import FlowSpan, current_flow_span
from gateway.telemetry.recorder import FlowTelemetry
from gateway.telemetry.stats import ExportStats
from gateway.testing import close_flow, load_plugins, make_config, make_flow, run_decisions
from l4gw_plugins.telemetry import TelemetryPlugin

CONFIG = """
[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:9001"]
"""


class Probe:
    """Uses the API as a plugin would: current span, attribute, event, a child span."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("probe")
        self.seen: dict[str, Any] = {}

    @hookimpl
    def l4gw_connection_opened(self, flow: Flow) -> None:
        self.seen["opened"] = trace.get_current_span()

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> None:
        span = trace.get_current_span()
        self.seen["admit"] = span
        span.set_attribute("probe.admitted", True)
        span.add_event("probe.event", {"n": 1})
        self.seen["flow_span"] = current_flow_span()
        with self.tracer.start_as_current_span("probe.lookup"):
            pass

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.seen["closed"] = trace.get_current_span()
        trace.get_current_span().set_attribute("probe.closed", flow.close_reason)


def rig(ratio: float) -> tuple[Any, Probe, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)), shutdown_on_exit=False)
    processor = SimpleSpanProcessor(spans)
    provider.add_span_processor(processor)

    def setup(config: TelemetryConfig, **_: Any) -> tel.Telemetry:
        return tel.Telemetry(
            config,
            "console",
            "none",
            provider.get_tracer("l4gw"),
            None,
            ExportStats(),
            provider,
            span_processor=processor,
            sample_ratio=ratio,
        )

    probe = Probe(provider)
    plugins = load_plugins(
        {"telemetry": TelemetryPlugin(FlowTelemetry(setup)), "probe": probe}, installed=True
    )
    return plugins, probe, spans


async def test_hooks_of_a_sampled_flow_run_inside_its_span():
    plugins, probe, spans = rig(1.0)
    config = make_config(CONFIG, plugins)
    flow = make_flow()
    decision = await run_decisions(plugins, config, flow)
    assert decision.ok
    assert isinstance(flow.span, FlowSpan)
    for hook in ("opened", "admit", "flow_span"):
        assert probe.seen[hook] is flow.span, hook
    close_flow(plugins, config, flow)
    assert probe.seen["closed"] is flow.span
    # Detached after the last closed hook.
    assert trace.get_current_span() is trace.INVALID_SPAN

    (server,) = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    (lookup,) = [s for s in spans.get_finished_spans() if s.name == "probe.lookup"]
    assert lookup.context.trace_id == server.context.trace_id == flow.span.trace_id
    assert lookup.parent is not None and lookup.parent.span_id == server.context.span_id
    assert server.attributes["probe.admitted"] is True
    # The telemetry plugin records after every other closed hook.
    assert server.attributes["probe.closed"] == "client_eof"
    assert [e.attributes for e in server.events if e.name == "probe.event"] == [{"n": 1}]


async def test_an_unsampled_flow_has_no_span_and_no_context():
    plugins, probe, spans = rig(0.0)
    config = make_config(CONFIG, plugins)
    flow = make_flow()
    assert (await run_decisions(plugins, config, flow)).ok
    assert flow.span is None
    assert probe.seen["admit"] is trace.INVALID_SPAN
    close_flow(plugins, config, flow)
    # The probe's own span is a root of its own, sampled by the sampler (here: not).
    assert spans.get_finished_spans() == ()


def test_the_span_api_writes_into_the_flow():
    flow = make_flow()
    span = FlowSpan(flow, 0xABC, 0xDEF, "vendor=x")
    context = span.get_span_context()
    assert (context.trace_id, context.span_id, context.is_remote) == (0xABC, 0xDEF, False)
    assert context.trace_flags.sampled and context.trace_state.to_header() == "vendor=x"
    assert span.is_recording()
    span.set_attributes({"a": 1, "b": "two"})
    span.add_event("e", {"k": "v"}, timestamp=123)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        span.record_exception(exc)
    span.update_name("renamed")
    span.set_status(trace.StatusCode.ERROR)
    span.end()
    assert flow.attributes == {"a": 1, "b": "two"}
    assert flow.events[0] == ("e", {"k": "v"}) and flow.event_times[0] == 123
    name, attrs = flow.events[1]
    assert name == "exception" and attrs["exception.type"] == "ValueError"
    assert attrs["exception.message"] == "boom" and "boom" in attrs["exception.stacktrace"]


def test_attach_and_detach_are_once_each():
    span = FlowSpan(make_flow(), 1, 2, None)
    span.attach()
    span.attach()
    assert trace.get_current_span() is span
    span.detach()
    assert trace.get_current_span() is trace.INVALID_SPAN
    span.detach()


@pytest.fixture(autouse=True)
def _no_span_left_behind() -> Any:
    yield
    assert trace.get_current_span() is trace.INVALID_SPAN
