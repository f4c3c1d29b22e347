"""Connections as raw records, and the spans made of them in the exporter process.

The telemetry plugin captures a sampled connection on the trio thread as
tuples of the values it already has (no attribute dicts, no cleaning, no
formatting): one *flow record* when the connection ends, holding a short
tuple per upstream connect attempt. The exporter process makes an *attempt
record* of each of those (:func:`expand`: the CLIENT span's ids and times),
then turns every record into a span record (:mod:`gateway.telemetry.records`)
with :func:`spans_of`: the semantic-conventions mapping lives here, off the
gateway's interpreter.

Rules kept here:

* **The mapping is the span contract.** Span names, kinds, attributes
  (OpenTelemetry semantic conventions v1.44.0 for a proxy, conventions.md
  A.2: ``client.*`` the real client, ``server.*`` the original destination (its
  address the SNI when one was peeked), ``network.local.*`` the listener (with an SNI,
  the address connected to), gateway values under ``l4gw.*``), events
  in time order with "closed" last, and error status for
  :attr:`CloseReason.FAILURES <gateway.flow.CloseReason.FAILURES>`.
* **Plugin values are cleaned here.** ``flow.attributes`` and ``flow.events``
  travel as the plugins left them (marshal refuses what it cannot carry, and
  then :func:`safe` cleans that record on the gateway's side); what
  OpenTelemetry does not accept becomes a string or is left out, here.
* **Records are positional tuples**: the ``F_*`` and ``A_*`` indexes below;
  the first field tells the record kinds apart (span records start with
  their name, a string).
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from random import getrandbits as _random_bits
from typing import TYPE_CHECKING, Any

from gateway.flow import CloseReason
from gateway.telemetry.records import (
    KIND_CLIENT,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_UNSET,
    Scope,
    SpanRecord,
    clean,
    to_readable,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor

FLOW = 1
"""First field of a flow record."""
ATTEMPT = 2
"""First field of an attempt record."""

# Flow record: one sampled connection (or UDP session), at its end.
F_TAG = 0
F_LISTENER = 1
"""The listener's attributes (one dict per listener, shared by its records)."""
F_TRANSPORT = 2
F_TRACE_ID = 3
F_SPAN_ID = 4
F_PARENT_ID = 5
"""Span id of the traceparent received, 0 for a new trace."""
F_STATE = 6
"""The sampler's W3C trace state, or None."""
F_START = 7
F_END = 8
F_CLIENT = 9
F_DESTINATION = 10
F_ID = 11
F_FROM_CLIENT = 12
F_TO_CLIENT = 13
F_REASON = 14
# F_REASON to F_SNI: the values that repeat from one connection to the next
# (the encoder caches their attributes together).
F_SPLICED = 15
F_TIER = 16
F_ROUTE = 17
F_CLUSTER = 18
F_ENDPOINT = 19
F_REFUSED_BY = 20
F_REFUSED_RULE = 21
F_SNI = 22
F_ALPN = 23
F_ERROR = 24
F_ATTRIBUTES = 25
"""``flow.attributes`` as the plugins left them, or None."""
F_EVENTS = 26
"""``flow.events`` as left, or None."""
F_EVENT_TIMES = 27
"""``flow.event_times``, or None."""
F_ADMITTED = 28
"""When admission passed (ns), or 0."""
F_ATTEMPTS = 29
"""The connect attempts (``AT_*`` tuples), or None."""
F_SCOPE = 30
FLOW_FIELDS = 31

# A connect attempt inside a flow record: what the gateway knows when it ends.
AT_END = 0
"""When the attempt ended (ns)."""
AT_ENDPOINT = 1
"""The endpoint as written in spans ("host:port")."""
AT_ERROR = 2
"""Why it failed, or None."""
AT_SECONDS = 3
"""How long it took (float seconds)."""
AT_SPAN_ID = 4
"""Its CLIENT span's id when a traceparent carried it upstream, else 0 (the
exporter picks one)."""
AT_HOST = 5
AT_PORT = 6
AT_CLUSTER = 7

# Attempt record: one upstream connect attempt as a span (made by :func:`expand`).
A_TAG = 0
A_TRANSPORT = 1
A_TRACE_ID = 2
A_SPAN_ID = 3
A_PARENT_ID = 4
"""The connection's (SERVER) span id."""
A_STATE = 5
A_START = 6
A_END = 7
A_CLUSTER = 8
A_HOST = 9
A_PORT = 10
A_ENDPOINT = 11
A_ERROR = 12
A_SCOPE = 13
ATTEMPT_FIELDS = 14

_FAILURES = CloseReason.FAILURES
_by_time = itemgetter(0)


def span_name(transport: str) -> str:
    """The SERVER span's name: low cardinality, never an address (conventions.md A.3)."""
    return "udp proxy" if transport == "udp" else "tcp proxy"


def expand(records: list[Any]) -> list[Any]:
    """``records`` with the attempt records of each flow record placed before it.

    An attempt whose span id the gateway did not pick (0) gets a random one
    here, as the SDK's default id generator would.
    """
    if not any(r[0] == FLOW and r[F_ATTEMPTS] for r in records):
        return records
    out: list[Any] = []
    for r in records:
        if r[0] == FLOW and r[F_ATTEMPTS]:
            out.extend(attempt_records(r))
        out.append(r)
    return out


def attempt_records(r: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The attempt records of flow record ``r``: each one a CLIENT span, child of
    the flow's SERVER span."""
    transport, trace_id, parent, state, scope = (
        r[F_TRANSPORT],
        r[F_TRACE_ID],
        r[F_SPAN_ID],
        r[F_STATE],
        r[F_SCOPE],
    )
    out = []
    for end, endpoint, error, seconds, span_id, host, port, cluster in r[F_ATTEMPTS]:
        out.append(
            (
                ATTEMPT,
                transport,
                trace_id,
                span_id or _random_bits(64) or 1,
                parent,
                state,
                end - int(seconds * 1e9),
                end,
                cluster,
                host,
                port,
                endpoint,
                error,
                scope,
            )
        )
    return out


def span_count(records: Sequence[Any]) -> int:
    """How many spans ``records`` make (a flow record: one, plus one per attempt)."""
    return len(records) + sum(len(r[F_ATTEMPTS]) for r in records if r[0] == FLOW and r[F_ATTEMPTS])


def spans_of(record: Sequence[Any], names: dict[tuple[str, Any], str] | None = None) -> SpanRecord:
    """The span record of a flow or attempt record (a span record is returned as is).

    Args:
        record: a flow, attempt or span record.
        names: a cache of CLIENT span names, by (transport, cluster).
    """
    tag = record[0]
    if tag == FLOW:
        return _server_span(record)
    if tag == ATTEMPT:
        return _client_span(record, names if names is not None else {})
    return tuple(record)


def _client_span(r: Sequence[Any], names: dict[tuple[str, Any], str]) -> SpanRecord:
    transport, cluster, error = r[A_TRANSPORT], r[A_CLUSTER], r[A_ERROR]
    name = names.get((transport, cluster))
    if name is None:
        name = names[(transport, cluster)] = f"{transport} connect {cluster}"
    attrs: dict[str, Any] = {
        "server.address": r[A_HOST],
        "server.port": r[A_PORT],
        "network.peer.address": r[A_HOST],
        "network.peer.port": r[A_PORT],
        "network.transport": transport,
        "l4gw.endpoint": r[A_ENDPOINT],
    }
    if cluster is not None:
        attrs["l4gw.cluster"] = cluster
    status, message = STATUS_UNSET, None
    if error is not None:
        attrs["error.type"] = CloseReason.CONNECT_FAILED
        status, message = STATUS_ERROR, error
    return (
        name,
        KIND_CLIENT,
        r[A_TRACE_ID],
        r[A_SPAN_ID],
        r[A_PARENT_ID],
        False,
        r[A_STATE],
        r[A_START],
        r[A_END],
        attrs,
        (),
        (),
        status,
        message,
        r[A_SCOPE],
        None,
    )


def _server_span(r: Sequence[Any]) -> SpanRecord:
    reason = r[F_REASON]
    end = r[F_END]
    events: list[tuple[int, str, dict[str, Any] | None]] = []
    if r[F_ADMITTED]:
        events.append((r[F_ADMITTED], "admitted", None))
    if r[F_EVENTS]:
        times = r[F_EVENT_TIMES] or ()
        for i, (name, attributes) in enumerate(r[F_EVENTS]):
            stamp = times[i] if i < len(times) else end
            events.append((stamp, str(name), clean(attributes) or None if attributes else None))
    for attempt in r[F_ATTEMPTS] or ():
        stamp, endpoint, error = attempt[AT_END], attempt[AT_ENDPOINT], attempt[AT_ERROR]
        ea: dict[str, Any] = {"l4gw.endpoint": endpoint}
        if error is not None:
            ea["error"] = error
        events.append((stamp, "connect_attempt", ea))
    events.sort(key=_by_time)
    events.append((end, "closed", {"l4gw.close_reason": reason}))
    status, message = STATUS_UNSET, None
    if reason in _FAILURES:
        status, message = STATUS_ERROR, r[F_ERROR] or reason
    start = r[F_START]
    parent_id = r[F_PARENT_ID]
    return (
        span_name(r[F_TRANSPORT]),
        KIND_SERVER,
        r[F_TRACE_ID],
        r[F_SPAN_ID],
        parent_id,
        bool(parent_id),
        r[F_STATE],
        start,
        max(start, end),
        server_attributes(r),
        events,
        (),
        status,
        message,
        r[F_SCOPE],
        None,
    )


def server_attributes(r: Sequence[Any]) -> dict[str, Any]:
    """The SERVER span's attributes of a flow record."""
    attrs = dict(r[F_LISTENER])
    client, destination = r[F_CLIENT], r[F_DESTINATION]
    attrs["client.address"] = client[0]
    attrs["client.port"] = client[1]
    sni = r[F_SNI]
    if sni:
        # Semantic conventions v1.44.0 deprecate tls.client.server_name for server.address,
        # the server's domain name when known: the name the client asked for. The address
        # it connected to is then the connection's local address (getsockname).
        attrs["network.local.address"] = destination[0]
        attrs["network.local.port"] = destination[1]
        attrs["server.address"] = sni
    else:
        attrs["server.address"] = destination[0]
    attrs["server.port"] = destination[1]
    attrs["network.transport"] = r[F_TRANSPORT]
    attrs["network.type"] = "ipv6" if ":" in client[0] else "ipv4"
    attrs["l4gw.flow.id"] = r[F_ID]
    attrs["l4gw.bytes.from_client"] = r[F_FROM_CLIENT]
    attrs["l4gw.bytes.to_client"] = r[F_TO_CLIENT]
    reason = r[F_REASON]
    attrs["l4gw.close_reason"] = reason
    attrs["l4gw.spliced"] = r[F_SPLICED]
    for key, index in OPTIONAL:
        value = r[index]
        if value is not None:
            attrs[key] = value
    if r[F_ALPN]:
        attrs["l4gw.alpn"] = tuple(r[F_ALPN])
    if reason in _FAILURES:
        attrs["error.type"] = reason
        if r[F_ERROR]:
            attrs["l4gw.error"] = r[F_ERROR]
    if r[F_ATTRIBUTES]:
        attrs.update(clean(r[F_ATTRIBUTES]))
    return attrs


OPTIONAL = (
    # Set when not None, in this order.
    ("l4gw.route", F_ROUTE),
    ("l4gw.cluster", F_CLUSTER),
    ("l4gw.endpoint", F_ENDPOINT),
    ("l4gw.tier", F_TIER),
    ("l4gw.refused_by", F_REFUSED_BY),
    ("l4gw.refused_rule", F_REFUSED_RULE),
)


def safe(record: Sequence[Any]) -> tuple[Any, ...]:
    """``record`` with the plugins' values cleaned, so that marshal takes it.

    The slow path: only for a batch that marshal refused.
    """
    if record[0] != FLOW:
        return tuple(record)
    r = list(record)
    if r[F_ATTRIBUTES]:
        r[F_ATTRIBUTES] = clean(r[F_ATTRIBUTES])
    if r[F_EVENTS]:
        r[F_EVENTS] = [(str(name), clean(attributes or {})) for name, attributes in r[F_EVENTS]]
    if r[F_EVENT_TIMES]:
        r[F_EVENT_TIMES] = [int(t) for t in r[F_EVENT_TIMES]]
    r[F_LISTENER] = clean(r[F_LISTENER])
    return tuple(r)


def scope_record(name: str, version: str, schema_url: str) -> Scope:
    """The :data:`~gateway.telemetry.records.Scope` of a tracer."""
    return (name, version, schema_url, None)


class ProcessorSink:
    """Hands records to an SDK span processor as SDK spans (tests, in-memory export).

    The exporter process is the normal destination; this sink exists so the
    recorder can be driven against the SDK's own in-memory exporter.
    """

    def __init__(self, processor: SpanProcessor, resource: Resource) -> None:
        self.processor = processor
        self.resource = resource
        self._names: dict[tuple[str, Any], str] = {}

    def add(self, record: Sequence[Any]) -> None:
        for r in expand([record]):
            self.processor.on_end(to_readable(spans_of(r, self._names), self.resource))
