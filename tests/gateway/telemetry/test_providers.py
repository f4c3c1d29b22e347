"""gateway/telemetry/providers.py: the decisions on plain values, the drop counter, set-up shapes."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import TelemetryConfig
from gateway.telemetry import providers as tel

CONFIG = TelemetryConfig("otlp", 0.25, "svc", 10.0)


@pytest.mark.parametrize(
    "env,configured,want",
    [
        ({}, "otlp", "otlp"),
        ({}, "none", "none"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "otlp", "none"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "none", "console"),
        ({"OTEL_TRACES_EXPORTER": " OTLP , console"}, "none", "otlp"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "console", "console"),
        ({"OTEL_TRACES_EXPORTER": ""}, "console", "console"),
        ({"OTEL_METRICS_EXPORTER": "none"}, "otlp", "otlp"),
    ],
)
def test_signal_exporter(env, configured, want):
    assert tel.signal_exporter("traces", configured, env) == want


def test_otlp_protocol_per_signal_then_general_then_default():
    assert tel.otlp_protocol("traces", {}) == "http/protobuf"
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert tel.otlp_protocol("traces", env) == "grpc"
    env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "http/protobuf"
    assert tel.otlp_protocol("metrics", env) == "http/protobuf"
    assert tel.otlp_protocol("traces", env) == "grpc"
    with pytest.raises(ValueError, match="http/json"):
        tel.otlp_protocol("traces", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_metric_interval_and_queue_size():
    assert tel.metric_interval_ms(CONFIG, {}) == 10_000
    assert tel.metric_interval_ms(CONFIG, {"OTEL_METRIC_EXPORT_INTERVAL": "250"}) == 250
    assert tel.metric_interval_ms(CONFIG, {"OTEL_METRIC_EXPORT_INTERVAL": "soon"}) == 10_000
    assert tel.metric_interval_ms(CONFIG, {"OTEL_METRIC_EXPORT_INTERVAL": "-1"}) == 10_000
    assert tel.queue_size({}) == tel.DEFAULT_QUEUE_SIZE
    assert tel.queue_size({"OTEL_BSP_MAX_QUEUE_SIZE": "16"}) == 16
    assert tel.queue_size({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}) == tel.DEFAULT_QUEUE_SIZE
    assert tel.queue_size({"OTEL_BSP_MAX_QUEUE_SIZE": "x"}) == tel.DEFAULT_QUEUE_SIZE


VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "text,want",
    [
        (VALID, (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1)),
        (VALID[:-2] + "00", (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 0)),
        # A future version may append fields; version 00 may not.
        ("01" + VALID[2:] + "-extra", (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7, 1)),
        (VALID + "-extra", None),
        ("ff" + VALID[2:], None),
        ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", None),
        (VALID.upper(), None),
        ("00-4bf92f35-00f067aa0ba902b7-01", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_parse_traceparent(text, want):
    assert tel.parse_traceparent(text) == want


@given(
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.booleans(),
)
def test_traceparent_round_trip(trace_id, span_id, sampled):
    text = tel.format_traceparent(trace_id, span_id, sampled)
    assert len(text) == 55
    assert tel.parse_traceparent(text) == (trace_id, span_id, 1 if sampled else 0)


def test_setup_off_is_none():
    config = TelemetryConfig("none", 1.0, "svc", 10.0)
    assert tel.setup(config, prometheus=False, env={}, install=False) is None
    # The variables can still turn one signal on, as the spec says.
    env = {"OTEL_TRACES_EXPORTER": "console"}
    telemetry = tel.setup(config, prometheus=False, env=env, install=False)
    assert telemetry is not None
    assert (telemetry.traces, telemetry.metrics, telemetry.meter) == ("console", "none", None)
    telemetry.shutdown()


def test_setup_console_and_prometheus():
    config = TelemetryConfig("console", 0.5, "svc", 10.0)
    telemetry = tel.setup(config, prometheus=True, env={}, install=False)
    assert telemetry is not None
    try:
        # Console metrics only when asked for by name: they would drown the spans.
        assert (telemetry.traces, telemetry.metrics) == ("console", "none")
        assert telemetry.tracer is not None and telemetry.meter is not None
        assert telemetry.tracer_provider is not None
        sampler = telemetry.tracer_provider.sampler
        assert "ParentBased" in sampler.get_description()
        assert "0.5" in sampler.get_description()
        assert telemetry.tracer_provider.resource.attributes["service.name"] == "svc"
        text = telemetry.prometheus_text().decode()
        assert re.search(r"^l4gw_telemetry_spans_dropped_total\{.*\} 0.0$", text, re.M)
    finally:
        telemetry.shutdown()


def test_setup_env_sampler_and_service_name_win():
    config = TelemetryConfig("console", 0.5, "svc", 10.0)
    env = {
        "OTEL_TRACES_SAMPLER": "always_off",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_METRICS_EXPORTER": "none",
    }

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the SDK reads these from the process environment itself
    try:
        telemetry = tel.setup(config, prometheus=False, env=env, install=False)
        assert telemetry is not None and telemetry.tracer_provider is not None
        assert "AlwaysOff" in telemetry.tracer_provider.sampler.get_description()
        assert telemetry.tracer_provider.resource.attributes["service.name"] == "from-env"
        telemetry.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_batch_processor_variables():
    assert tel.batch_size({}) == tel.DEFAULT_BATCH_SIZE
    assert tel.batch_size({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64"}) == 64
    # Never more than the queue holds (the SDK's rule).
    env = {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64", "OTEL_BSP_MAX_QUEUE_SIZE": "16"}
    assert tel.batch_size(env) == 16
    assert tel.batch_size({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "-3"}) == tel.DEFAULT_BATCH_SIZE
    assert tel.schedule_delay({}) == tel.DEFAULT_SCHEDULE_DELAY
    assert tel.schedule_delay({"OTEL_BSP_SCHEDULE_DELAY": "250"}) == 0.25
    assert tel.schedule_delay({"OTEL_BSP_SCHEDULE_DELAY": "soon"}) == tel.DEFAULT_SCHEDULE_DELAY


def test_exporter_settings_are_plain_values():
    import marshal

    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": "svc", "list": ("a", "b")})
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_MAX_QUEUE_SIZE": "99"}
    settings = tel.exporter_settings("otlp", resource, env)
    assert settings["protocol"] == "grpc" and settings["queue_size"] == 99
    assert settings["resource"][0]["service.name"] == "svc"
    assert marshal.loads(marshal.dumps(settings)) == settings  # the exporter's first message
    assert tel.exporter_settings("console", resource, env)["protocol"] == ""


def test_other_plugins_spans_reach_the_collector(monkeypatch):
    """Spans a plugin makes through the global provider take the gateway's way out."""
    from otlp_receiver import OTLPReceiver

    receiver = OTLPReceiver()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")  # the SDK reads it itself
        env = {**os.environ, "OTEL_METRICS_EXPORTER": "none"}
        telemetry = tel.setup(CONFIG, prometheus=False, env=env, install=False)
        assert telemetry is not None and telemetry.tracer_provider is not None
        assert telemetry.spans is not None and telemetry.spans.pid is not None
        tracer = telemetry.tracer_provider.get_tracer("myplugin", "1.0")
        for i in range(40):
            tracer.start_span("myplugin.work", attributes={"i": i}).end()
        telemetry.shutdown()
        spans = receiver.spans()
        assert sorted(s.attributes["i"] for s in spans) == list(range(40))
        assert {(s.name, s.scope) for s in spans} == {("myplugin.work", "myplugin")}
        assert telemetry.stats.spans_exported == len(spans)
    finally:
        receiver.stop()
