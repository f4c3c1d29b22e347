"""gateway/telemetry/records.py and gateway/telemetry/flows.py: span records on plain values."""

from __future__ import annotations

import enum
import marshal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.telemetry import flows as tf
from gateway.telemetry.otlp import SpanEncoder
from gateway.telemetry.records import (
    REC_ATTRIBUTES,
    REC_END,
    REC_EVENTS,
    REC_KIND,
    REC_NAME,
    REC_PARENT_ID,
    REC_SPAN_ID,
    REC_START,
    REC_STATUS,
    REC_STATUS_MESSAGE,
    REC_TRACE_ID,
    REC_TRACE_STATE,
    clean,
    clean_value,
    from_readable,
    record_span_processor,
    to_readable,
)

SCOPE = ("l4gw", "1.0", "https://opentelemetry.io/schemas/1.44.0", None)
LISTENER = {"l4gw.listener": "public", "network.local.address": "127.0.0.1"}


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    HIGH = 3


class Name(str, enum.Enum):  # noqa: UP042 - its __str__ is "Name.ALICE": the case tested
    ALICE = "alice"


@pytest.mark.parametrize(
    "value,want",
    [
        ("s", "s"),
        (3, 3),
        (0.5, 0.5),
        (True, True),
        (b"\x00", b"\x00"),
        (None, None),
        (Level.HIGH, 3),
        (Color.RED, "Color.RED"),
        (["a", "b"], ("a", "b")),
        ((1, 2), (1, 2)),
        ([1, "a"], ("1", "a")),
        ([True, 1], ("True", "1")),
        ([None, "x"], ("", "x")),
        ([[1]], ("(1,)",)),
        ([], ()),
        (object, "<class 'object'>"),
    ],
)
def test_clean_value(value, want):
    got = clean_value(value)
    assert got == want
    assert type(got) is type(want)
    marshal.dumps(got)  # what cleaning is for


def test_clean_value_subclasses_become_their_base():
    assert type(clean_value(Level.HIGH)) is int
    assert type(clean_value(Name.ALICE)) is str
    assert clean(
        {"a": None, "b": Name.ALICE, 3: 1},  # type: ignore[dict-item]
    ) == {"b": "alice", "3": 1}


def sdk_spans() -> tuple[list, Resource]:
    resource = Resource.create({"service.name": "t"})
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("other", "2.0")
    span = tracer.start_span("work", kind=SpanKind.INTERNAL, attributes={"n": 1, "s": ("a",)})
    span.add_event("step", {"k": "v"})
    span.set_status(Status(StatusCode.ERROR, "bad"))
    span.end()
    child = tracer.start_span("child", context=None)
    child.end()
    return list(exporter.get_finished_spans()), resource


def test_sdk_span_round_trip_encodes_the_same():
    spans, resource = sdk_spans()
    back = [to_readable(from_readable(s), resource) for s in spans]
    assert ExportTraceServiceRequest.FromString(SpanEncoder().encode(back)) == encode_spans(spans)
    record = from_readable(spans[0])
    assert record[REC_NAME] == "work"
    assert record[REC_STATUS] == StatusCode.ERROR.value
    assert record[REC_STATUS_MESSAGE] == "bad"
    assert marshal.loads(marshal.dumps(record)) == record


def test_record_processor_forwards_sampled_spans_only():
    got: list = []
    provider = TracerProvider()
    provider.add_span_processor(record_span_processor(got.append))
    provider.get_tracer("x").start_span("kept").end()
    off = TracerProvider(sampler=ALWAYS_OFF)
    off.add_span_processor(record_span_processor(got.append))
    off.get_tracer("x").start_span("not sampled").end()
    assert [r[REC_NAME] for r in got] == ["kept"]


def flow_record(**changes: object) -> tuple:
    now = time.time_ns()
    fields: dict[int, object] = {
        tf.F_TAG: tf.FLOW,
        tf.F_LISTENER: LISTENER,
        tf.F_TRANSPORT: "tcp",
        tf.F_TRACE_ID: 0x4BF92F3577B34DA6A3CE929D0E0E4736,
        tf.F_SPAN_ID: 0x1111,
        tf.F_PARENT_ID: 0,
        tf.F_STATE: None,
        tf.F_START: now - 5_000_000,
        tf.F_END: now,
        tf.F_CLIENT: ("198.18.0.1", 40000),
        tf.F_DESTINATION: ("198.18.1.1", 443),
        tf.F_ID: 7,
        tf.F_FROM_CLIENT: 10,
        tf.F_TO_CLIENT: 20,
        tf.F_REASON: "backend_eof",
        tf.F_SPLICED: False,
        tf.F_TIER: "copy",
        tf.F_ROUTE: "r",
        tf.F_CLUSTER: "api",
        tf.F_ENDPOINT: "127.0.0.1:9001",
        tf.F_REFUSED_BY: None,
        tf.F_REFUSED_RULE: None,
        tf.F_SNI: None,
        tf.F_ALPN: None,
        tf.F_ERROR: None,
        tf.F_ATTRIBUTES: None,
        tf.F_EVENTS: None,
        tf.F_EVENT_TIMES: None,
        tf.F_ADMITTED: now - 4_000_000,
        tf.F_ATTEMPTS: (
            (now - 2_000_000, "127.0.0.1:9001", None, 0.001, 0, "127.0.0.1", 9001, "api"),
        ),
        tf.F_SCOPE: SCOPE,
    }
    for name, value in changes.items():
        fields[getattr(tf, name)] = value
    assert len(fields) == tf.FLOW_FIELDS
    return tuple(fields[i] for i in range(tf.FLOW_FIELDS))


def test_flow_record_to_server_span():
    record = flow_record(
        F_EVENTS=[("myplugin.seen", {"tags": ["a", "b"], "skip": None})],
        F_EVENT_TIMES=[flow_record()[tf.F_END] - 3_000_000],
        F_ATTRIBUTES={"myplugin.user": "alice", "myplugin.none": None},
        F_ALPN=("h2",),
        F_SNI="api.example",
    )
    span = tf.spans_of(record)
    assert span[REC_NAME] == "tcp proxy"
    assert span[REC_KIND] == SpanKind.SERVER.value
    assert span[REC_PARENT_ID] == 0
    a = span[REC_ATTRIBUTES]
    assert a["l4gw.listener"] == "public"
    assert (a["client.address"], a["client.port"]) == ("198.18.0.1", 40000)
    # With an SNI, server.address is that name (tls.client.server_name is deprecated for
    # it in semantic conventions v1.44.0); the address connected to is the local one.
    assert (a["server.address"], a["server.port"]) == ("api.example", 443)
    assert (a["network.local.address"], a["network.local.port"]) == ("198.18.1.1", 443)
    assert "tls.client.server_name" not in a
    assert a["network.type"] == "ipv4" and a["network.transport"] == "tcp"
    assert a["l4gw.flow.id"] == 7
    assert a["l4gw.route"] == "r" and a["l4gw.tier"] == "copy" and a["l4gw.spliced"] is False
    assert a["l4gw.alpn"] == ("h2",)
    assert a["myplugin.user"] == "alice" and "myplugin.none" not in a
    assert "l4gw.refused_by" not in a and "error.type" not in a
    names = [e[1] for e in span[REC_EVENTS]]
    assert names == ["admitted", "myplugin.seen", "connect_attempt", "closed"]
    assert span[REC_EVENTS][1][2] == {"tags": ("a", "b")}
    assert span[REC_STATUS] == 0
    # The shared listener dict is copied, never changed.
    assert LISTENER == {"l4gw.listener": "public", "network.local.address": "127.0.0.1"}


def test_failed_flow_is_an_error_with_its_reason():
    span = tf.spans_of(
        flow_record(
            F_REASON="refused",
            F_REFUSED_BY="ratelimit",
            F_REFUSED_RULE="per_client",
            F_ERROR="too fast",
            F_CLIENT=("fd00::1", 5000),
            F_TRANSPORT="udp",
            F_PARENT_ID=0x2222,
            F_ATTEMPTS=None,
            F_ADMITTED=0,
        )
    )
    a = span[REC_ATTRIBUTES]
    assert span[REC_NAME] == "udp proxy"
    assert (span[REC_STATUS], span[REC_STATUS_MESSAGE]) == (StatusCode.ERROR.value, "too fast")
    assert a["error.type"] == "refused" and a["l4gw.error"] == "too fast"
    assert (a["l4gw.refused_by"], a["l4gw.refused_rule"]) == ("ratelimit", "per_client")
    assert a["network.type"] == "ipv6"
    assert span[REC_PARENT_ID] == 0x2222
    assert [e[1] for e in span[REC_EVENTS]] == ["closed"]


def test_a_flow_record_expands_into_its_attempt_records():
    end = flow_record()[tf.F_END]
    attempts = (
        (
            end - 5_000_000,
            "127.0.0.1:9001",
            "Connection refused",
            0.002,
            0,
            "127.0.0.1",
            9001,
            "api",
        ),
        (end - 2_000_000, "127.0.0.1:9002", None, 0.001, 0x77, "127.0.0.1", 9002, "api"),
    )
    record = flow_record(F_ATTEMPTS=attempts, F_STATE="k=v")
    plain = flow_record(F_ATTEMPTS=None)
    out = tf.expand([plain, record])
    assert out[0] is plain and out[-1] is record and len(out) == 4
    assert tf.span_count([plain, record]) == 4
    first, second = (tf.spans_of(r) for r in out[1:3])
    for span, attempt in zip((first, second), attempts, strict=True):
        assert span[REC_KIND] == SpanKind.CLIENT.value and span[REC_NAME] == "tcp connect api"
        assert span[REC_TRACE_ID] == record[tf.F_TRACE_ID]
        assert span[REC_PARENT_ID] == record[tf.F_SPAN_ID]
        assert span[REC_TRACE_STATE] == "k=v"
        assert span[REC_END] == attempt[tf.AT_END]
        assert span[REC_START] == attempt[tf.AT_END] - int(attempt[tf.AT_SECONDS] * 1e9)
        assert span[REC_ATTRIBUTES]["l4gw.endpoint"] == attempt[tf.AT_ENDPOINT]
    assert first[REC_SPAN_ID] not in (0, record[tf.F_SPAN_ID])  # picked by the exporter
    assert second[REC_SPAN_ID] == 0x77  # named by the traceparent sent upstream
    assert first[REC_STATUS] == StatusCode.ERROR.value
    assert tf.expand([plain]) == [plain]


def test_attempt_record_to_client_span():
    now = time.time_ns()
    record = (tf.ATTEMPT, "tcp", 1, 0x33, 0x11, None, now - 10, now, "api", "::1", 9001)
    record += ("[::1]:9001", "Connection refused", SCOPE)
    assert len(record) == tf.ATTEMPT_FIELDS
    span = tf.spans_of(record)
    assert span[REC_NAME] == "tcp connect api"
    assert span[REC_KIND] == SpanKind.CLIENT.value
    assert span[REC_PARENT_ID] == 0x11
    a = span[REC_ATTRIBUTES]
    assert (a["server.address"], a["server.port"], a["l4gw.endpoint"]) == (
        "::1",
        9001,
        "[::1]:9001",
    )
    assert a["error.type"] == "connect_failed"
    assert (span[REC_STATUS], span[REC_STATUS_MESSAGE]) == (2, "Connection refused")


def test_safe_makes_a_record_marshal_can_carry():
    record = flow_record(
        F_ATTRIBUTES={"p.obj": object(), "p.enum": Color.RED},
        F_EVENTS=[("e", {"o": object()})],
        F_EVENT_TIMES=[1],
    )
    with pytest.raises(ValueError):
        marshal.dumps(record)
    back = marshal.loads(marshal.dumps(tf.safe(record)))
    a = tf.spans_of(back)[REC_ATTRIBUTES]
    assert a["p.obj"].startswith("<object object") and a["p.enum"] == "Color.RED"


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10),
        st.one_of(
            st.none(),
            st.text(max_size=10),
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.booleans(),
            st.lists(st.one_of(st.integers(0, 9), st.text(max_size=3)), max_size=3),
        ),
        max_size=6,
    )
)
def test_any_plugin_attributes_survive_marshal_and_encode(attributes):
    record = tf.safe(flow_record(F_ATTRIBUTES=attributes))
    span = tf.spans_of(marshal.loads(marshal.dumps(record)))
    resource = Resource.create({"service.name": "t"})
    encoded = SpanEncoder().encode_records([span], resource)
    assert encoded == SpanEncoder().encode([to_readable(span, resource)])
    decoded = ExportTraceServiceRequest.FromString(encoded)
    (sdk_span,) = decoded.resource_spans[0].scope_spans[0].spans
    keys = {kv.key for kv in sdk_span.attributes}
    assert {str(k) for k, v in attributes.items() if v is not None} <= keys
