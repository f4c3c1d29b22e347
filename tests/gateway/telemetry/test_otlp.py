"""gateway/telemetry/otlp.py: the same ExportTraceServiceRequest as the SDK's encoder."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway.telemetry.otlp import SpanEncoder


def same(spans) -> None:
    encoder = SpanEncoder()
    want = encode_spans(spans)
    for _ in range(2):  # the second time from the caches
        got = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        assert got == want, f"\n{got}\n!=\n{want}"


def provider(resource: Resource | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider(resource=resource or Resource.create({"service.name": "t"}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


def test_spans_of_every_shape():
    tp, exporter = provider(Resource.create({"service.name": "t", "n": 3}, "https://s/1"))
    tracer = tp.get_tracer("l4gw", "1.0", schema_url="https://opentelemetry.io/schemas/1.44.0")
    other = tp.get_tracer("other")
    remote = SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
        0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "x"), ("b", "2")]),
    )
    parent = set_span_in_context(NonRecordingSpan(remote))
    s = tracer.start_span(
        "tcp proxy",
        parent,
        SpanKind.SERVER,
        attributes={
            "str": "value",
            "empty": "",
            "unicode": "żółw 🐢",
            "t": True,
            "f": False,
            "zero": 0,
            "int": 300,
            "neg": -5,
            "big": 2**62,
            "float": 0.25,
            "strs": ("a", "b"),
            "ints": (1, -2),
            "floats": (1.5,),
            "bools": (True, False),
            "long": "x" * 300,
        },
        links=[Link(remote, {"why": "because"})],
    )
    s.add_event("plain")
    s.add_event("with", {"k": "v", "n": 1})
    s.set_status(Status(StatusCode.ERROR, "connect refused"))
    s.end()
    c = tracer.start_span("tcp connect api", set_span_in_context(s), SpanKind.CLIENT)
    c.set_status(Status(StatusCode.OK))
    c.end()
    o = other.start_span("internal")
    o.end()
    spans = exporter.get_finished_spans()
    same(spans)
    same(spans[:1])


def test_many_resources_and_batches():
    tp1, e1 = provider(Resource.create({"service.name": "a"}))
    tp2, e2 = provider(Resource.create({"service.name": "b"}))
    for i in range(20):
        for tp in (tp1, tp2):
            span = tp.get_tracer("x").start_span(f"s{i % 3}", attributes={"i": i})
            span.end()
    mixed = [
        s
        for pair in zip(e1.get_finished_spans(), e2.get_finished_spans(), strict=True)
        for s in pair
    ]
    same(mixed)


values = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=3).map(tuple),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=8), st.text(max_size=30))
def test_any_attributes(attributes, name):
    tp, exporter = provider()
    span = tp.get_tracer("x").start_span(name or "n", attributes=attributes)
    span.add_event("e", attributes)
    span.end()
    same(exporter.get_finished_spans())


# --- the gateway's flow and attempt records, encoded directly -------------------------------

from gateway.telemetry import flows as tf  # noqa: E402

_SCOPE = ("l4gw", "1.0", "https://opentelemetry.io/schemas/1.44.0", None)
_RESOURCE = Resource.create({"service.name": "t"})
_text = st.text(max_size=12)
_maybe = st.one_of(st.none(), _text)


@st.composite
def flow_records(draw: st.DrawFn) -> tuple:
    start = draw(st.integers(1, 2**62))
    end = draw(st.integers(1, 2**62))
    fields = [None] * tf.FLOW_FIELDS
    fields[tf.F_TAG] = tf.FLOW
    fields[tf.F_LISTENER] = draw(
        st.sampled_from(
            [
                {"l4gw.listener": "public", "network.local.address": "::", "network.local.port": 1},
                {"l4gw.listener": "tp", "l4gw.transparent": True},
            ]
        )
    )
    fields[tf.F_TRANSPORT] = draw(st.sampled_from(["tcp", "udp"]))
    fields[tf.F_TRACE_ID] = draw(st.integers(1, 2**128 - 1))
    fields[tf.F_SPAN_ID] = draw(st.integers(1, 2**64 - 1))
    fields[tf.F_PARENT_ID] = draw(st.one_of(st.just(0), st.integers(1, 2**64 - 1)))
    fields[tf.F_STATE] = draw(st.sampled_from([None, "vendor=x"]))
    fields[tf.F_START], fields[tf.F_END] = start, end
    fields[tf.F_CLIENT] = (
        draw(st.sampled_from(["198.18.0.1", "fd00::1"])),
        draw(st.integers(0, 65535)),
    )
    fields[tf.F_DESTINATION] = ("198.18.1.1", draw(st.integers(0, 65535)))
    fields[tf.F_ID] = draw(st.integers(0, 2**40))
    fields[tf.F_FROM_CLIENT] = draw(st.integers(0, 2**70))
    fields[tf.F_TO_CLIENT] = draw(st.integers(0, 2**40))
    fields[tf.F_REASON] = draw(
        st.sampled_from(["client_eof", "refused", "connect_failed", "drain"])
    )
    fields[tf.F_SPLICED] = draw(st.booleans())
    for index in (tf.F_TIER, tf.F_ROUTE, tf.F_CLUSTER, tf.F_ENDPOINT, tf.F_REFUSED_BY):
        fields[index] = draw(_maybe)
    fields[tf.F_REFUSED_RULE], fields[tf.F_SNI], fields[tf.F_ERROR] = (
        draw(_maybe),
        draw(_maybe),
        draw(_maybe),
    )
    fields[tf.F_ALPN] = draw(
        st.one_of(st.none(), st.lists(_text, min_size=1, max_size=2).map(tuple))
    )
    fields[tf.F_ATTRIBUTES] = draw(
        st.one_of(
            st.none(),
            st.dictionaries(st.sampled_from(["p.a", "p.b", "l4gw.route", "client.port"]), _maybe),
        )
    )
    events = draw(
        st.lists(st.tuples(_text, st.dictionaries(_text, _maybe, max_size=2)), max_size=3)
    )
    fields[tf.F_EVENTS] = events or None
    fields[tf.F_EVENT_TIMES] = [
        draw(st.integers(0, 2**62)) for _ in events[: draw(st.integers(0, 3))]
    ] or None
    fields[tf.F_ADMITTED] = draw(st.one_of(st.just(0), st.integers(1, 2**62)))
    attempt = st.tuples(
        st.integers(10**9, 2**62),
        _text,
        _maybe,
        st.floats(0, 1),
        st.one_of(st.just(0), st.integers(1, 2**64 - 1)),
        st.sampled_from(["127.0.0.1", "::1"]),
        st.integers(0, 65535),
        _maybe,
    )
    attempts = draw(st.lists(attempt, max_size=2))
    fields[tf.F_ATTEMPTS] = tuple(attempts) or None
    fields[tf.F_SCOPE] = _SCOPE
    return tuple(fields)


@settings(max_examples=150, deadline=None)
@given(st.lists(flow_records(), min_size=1, max_size=3))
def test_flow_records_encode_like_their_spans(records):
    records = tf.expand(records)  # as the exporter receives them: attempts first
    encoder = SpanEncoder()
    for _ in range(2):  # the second time from the caches
        direct = encoder.encode_records(records, _RESOURCE)
        general = SpanEncoder().encode_records([tf.spans_of(r) for r in records], _RESOURCE)
        assert direct == general


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["tcp", "udp"]),
    _maybe,
    st.sampled_from(["127.0.0.1", "::1"]),
    st.integers(0, 65535),
    _maybe,
    st.sampled_from([None, "k=v"]),
)
def test_attempt_records_encode_like_their_spans(transport, cluster, host, port, error, state):
    record = (tf.ATTEMPT, transport, 2**127 + 5, 77, 88, state, 10, 20, cluster, host, port)
    record = (*record, f"{host}:{port}", error, _SCOPE)
    encoder = SpanEncoder()
    for _ in range(2):
        direct = encoder.encode_records([record], _RESOURCE)
        assert direct == SpanEncoder().encode_records([tf.spans_of(record)], _RESOURCE)
