"""Finished spans as plain tuples: what the gateway hands to its span exporter.

A span record is a :data:`SpanRecord` tuple of ints, strings, dicts and
tuples, in the field order of the ``REC_*`` indexes below. The gateway builds
records on its trio thread (no OpenTelemetry objects per connection), sends
them in batches to the exporter process (``gateway.telemetry.pipe``), which
encodes them to OTLP (``gateway.telemetry.otlp``) or, for the console, turns
them back into SDK spans (:func:`to_readable`).

Rules kept here:

* **Only exact built-in types.** A record holds ``str``, ``int``, ``float``,
  ``bool``, ``bytes``, ``None``, and tuples, lists and dicts of those, so that it
  survives ``marshal`` (the batch format, faster than pickle) and means the
  same on both sides. :func:`clean_value` turns whatever a plugin passed to
  ``flow.set_attribute``/``add_event`` into such a value, as OpenTelemetry
  would accept it (primitive or homogeneous sequence).
* **Only sampled spans become records.** The sampling decision is taken
  before, so a record is always exported (trace flags "sampled").
* **Same meaning as the SDK's span.** :func:`from_readable` and
  :func:`to_readable` convert both ways without loss of anything the OTLP
  encoder writes (``tests/gateway/telemetry/test_otlp.py`` compares the encodings).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

SpanRecord = tuple[Any, ...]
"""A finished span; see the ``REC_*`` field indexes."""

Event = tuple[int, str, "dict[str, Any] | None"]
"""(time ns, name, attributes or None)."""

Scope = tuple[str, str, str, "tuple[tuple[str, Any], ...] | None"]
"""An instrumentation scope: (name, version, schema URL, attributes or None)."""

REC_NAME = 0
REC_KIND = 1
"""SDK ``SpanKind`` value: 0 internal, 1 server, 2 client, 3 producer, 4 consumer."""
REC_TRACE_ID = 2
REC_SPAN_ID = 3
REC_PARENT_ID = 4
"""The parent's span id; 0 for a root span."""
REC_PARENT_REMOTE = 5
"""The parent came from another process (a traceparent received)."""
REC_TRACE_STATE = 6
"""W3C ``tracestate`` header value, or None."""
REC_START = 7
REC_END = 8
REC_ATTRIBUTES = 9
"""dict, or None."""
REC_EVENTS = 10
"""Sequence of :data:`Event`."""
REC_LINKS = 11
"""Sequence of (trace id, span id, is remote, trace state or None, attributes or None, dropped
attributes count)."""
REC_STATUS = 12
"""SDK ``StatusCode`` value (the same numbers as OTLP): 0 unset, 1 ok, 2 error."""
REC_STATUS_MESSAGE = 13
REC_SCOPE = 14
"""A :data:`Scope`."""
REC_DROPPED = 15
"""None, or what the SDK dropped over its limits: (attributes, events, links, per-event
attribute counts). Only spans from the SDK have any."""

KIND_SERVER = 1
KIND_CLIENT = 2
STATUS_UNSET = 0
STATUS_ERROR = 2

_SEQUENCE_ITEMS = frozenset({str, bool, int, float})
"""What OpenTelemetry allows in a homogeneous sequence attribute."""


def clean_value(value: Any) -> Any:
    """An attribute value OpenTelemetry accepts (primitive or homogeneous sequence), or None.

    Plugins may pass anything to ``flow.set_attribute``/``add_event``; the SDK's
    exporter would drop an unsupported value with a log line per span, and
    marshal would refuse the whole batch. Subclasses (an ``IntEnum``, a
    ``StrEnum``) become their plain base type.
    """
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or kind is bytes:
        return value
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)  # the text, not a subclass's __str__ (Enum's "Name.X")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = [clean_value(v) for v in value]
        kinds = {type(v) for v in items}
        if len(kinds) == 1 and kinds <= _SEQUENCE_ITEMS:
            return tuple(items)
        return tuple("" if v is None else str(v) for v in items)
    return str(value)


def clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``attributes`` with every value cleaned; None values left out."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        cleaned = clean_value(value)
        if cleaned is not None:
            out[str(key)] = cleaned
    return out


def format_trace_state(state: Mapping[str, str] | None) -> str | None:
    """A trace state as its W3C header value (None when empty)."""
    if not state:
        return None
    return ",".join(f"{k}={v}" for k, v in state.items())


# --- SDK spans (lazy imports: only the exporter process and tests need them) ------------------


def scope_of(scope: Any) -> Scope:
    """The record form of an SDK ``InstrumentationScope`` (or None)."""
    if scope is None:
        return ("", "", "", None)
    attributes = getattr(scope, "attributes", None)
    return (
        scope.name or "",
        scope.version or "",
        scope.schema_url or "",
        tuple((k, clean_value(v)) for k, v in attributes.items()) if attributes else None,
    )


def from_readable(span: ReadableSpan) -> SpanRecord:
    """The record of a finished SDK span (other plugins' own spans, tests)."""
    context = span.context
    assert context is not None
    parent = span.parent
    events = tuple(
        (e.timestamp, e.name, clean(e.attributes) if e.attributes else None) for e in span.events
    )
    links = tuple(
        (
            link.context.trace_id,
            link.context.span_id,
            link.context.is_remote,
            format_trace_state(link.context.trace_state),
            clean(link.attributes) if link.attributes else None,
            link.dropped_attributes,
        )
        for link in span.links
    )
    event_drops = tuple(e.dropped_attributes for e in span.events)
    dropped = None
    if span.dropped_attributes or span.dropped_events or span.dropped_links or any(event_drops):
        dropped = (span.dropped_attributes, span.dropped_events, span.dropped_links, event_drops)
    return (
        span.name,
        span.kind.value,
        context.trace_id,
        context.span_id,
        parent.span_id if parent is not None else 0,
        bool(parent is not None and parent.is_remote),
        format_trace_state(context.trace_state),
        span.start_time or 0,
        span.end_time or 0,
        clean(span.attributes) if span.attributes else None,
        events,
        links,
        span.status.status_code.value,
        span.status.description,
        scope_of(span.instrumentation_scope),
        dropped,
    )


def to_readable(record: SpanRecord, resource: Resource) -> ReadableSpan:
    """An SDK span with the record's content (for SDK exporters and processors)."""
    from opentelemetry.sdk.trace import Event as SdkEvent
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import TraceState

    sampled = TraceFlags(TraceFlags.SAMPLED)

    def state(text: str | None) -> TraceState | None:
        return TraceState.from_header([text]) if text else None

    (name, kind, trace_id, span_id, parent_id, parent_remote, trace_state, start, end) = record[:9]
    context = SpanContext(
        trace_id, span_id, is_remote=False, trace_flags=sampled, trace_state=state(trace_state)
    )
    parent = None
    if parent_id:
        parent = SpanContext(trace_id, parent_id, is_remote=parent_remote, trace_flags=sampled)
    name_, version, schema_url, scope_attrs = record[REC_SCOPE]
    scope = InstrumentationScope(
        name_, version or None, schema_url or None, dict(scope_attrs) if scope_attrs else None
    )
    events = [SdkEvent(n, a, t) for t, n, a in record[REC_EVENTS]]
    links = [
        Link(SpanContext(t, s, is_remote=r, trace_flags=sampled, trace_state=state(ts)), a)
        for t, s, r, ts, a, _ in record[REC_LINKS]
    ]
    message = record[REC_STATUS_MESSAGE]
    return ReadableSpan(
        name,
        context,
        parent,
        resource,
        record[REC_ATTRIBUTES] or {},
        events,
        links,
        SpanKind(kind),
        None,
        Status(StatusCode(record[REC_STATUS]), message),
        start,
        end,
        scope,
    )


def record_span_processor(add: Callable[[SpanRecord], None]) -> SpanProcessor:
    """An SDK span processor handing sampled spans on as records (other plugins' spans).

    Plugins that create their own spans through the global tracer provider
    share the gateway's pipeline: their spans reach the same exporter process.
    """
    from opentelemetry.sdk.trace import SpanProcessor

    class RecordSpanProcessor(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            context = span.context
            if context is not None and context.trace_flags.sampled:
                add(from_readable(span))

    return RecordSpanProcessor()
