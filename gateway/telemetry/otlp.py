"""A fast OTLP trace encoder: span records to ``ExportTraceServiceRequest`` bytes.

Why it exists: the exporters' own encoder builds one protobuf object per
attribute, event and span in Python, several times the CPU of relaying a
short connection. This one writes the protobuf wire format directly from
span records (:mod:`gateway.telemetry.records`) and remembers the encoding of
every attribute it has seen (listener, route, cluster, endpoint, close
reason … repeat on every span), so most of a span is a few byte-string joins.
It runs in the exporter process, off the gateway's interpreter.

Rules kept here:

* **Byte-for-byte meaning of the SDK's encoder.** The same messages, fields
  and presence as ``opentelemetry.exporter.otlp.proto.common.trace_encoder``
  (status always present, trace state and parent only when set, span flags
  with the is-remote bits); ``tests/gateway/telemetry/test_otlp.py`` parses both and
  compares them for spans of every shape.
* **Bounded memory.** The attribute cache is cleared when it reaches
  :data:`CACHE_SIZE` entries. Integer values (ports, counts, ids: mostly
  unique) are never cached, only their keys, so they do not push the
  repeated values out.

Wire format reference: opentelemetry-proto ``trace/v1/trace.proto``,
``common/v1/common.proto``, ``resource/v1/resource.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway.flow import CloseReason
from gateway.telemetry import flows as tf
from gateway.telemetry.records import REC_SCOPE, Scope, SpanRecord, clean, from_readable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

CACHE_SIZE = 8192

_pack_q = struct.Struct("<Q").pack
_pack_times = struct.Struct("<BQBQ").pack
"""A span's start and end time fields (tags 0x39, 0x41)."""
_pack_event_time = struct.Struct("<BQ").pack
_pack_i = struct.Struct("<I").pack
_pack_d = struct.Struct("<d").pack
_SMALL = [bytes((i,)) for i in range(128)]
_INT_LIMIT = 1 << 63
"""Ints below this take the uncached path (a varint of at most 9 bytes)."""

# SDK SpanKind (INTERNAL=0, SERVER=1, ...) -> OTLP SpanKind (INTERNAL=1, SERVER=2, ...).
_KIND = [b"\x30" + _SMALL[i + 1] for i in range(5)]
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(0x300)  # ... | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_STATUS = [b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02"]
"""Status messages without a description, by code."""


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    if n < 16384:  # ports, small counts
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _header(tag: bytes, length: int) -> bytes:
    """The tag and length of a length-delimited field whose payload follows."""
    return tag + (_SMALL[length] if length < 128 else _varint(length))


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else _varint(n)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (the SDK's ``_encode_value``)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value if value >= 0 else value + (1 << 64))
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        items = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", items)
    raise TypeError(f"cannot encode {type(value).__name__} as an attribute value")


def _key_value(key: str, value: Any) -> bytes:
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value))


def _int_attribute(tag: bytes, prefix: bytes, value: int) -> bytes:
    """An attribute with a non-negative int value; ``prefix`` is its encoded key and
    the value's tag (``0a <len> key 12``)."""
    if not 0 <= value < _INT_LIMIT:
        return tag + _field(b"", prefix[:-1] + _field(b"\x12", _any_value(value)))
    number = b"\x18" + (_SMALL[value] if value < 128 else _varint(value))
    body = prefix + _SMALL[len(number)] + number
    return tag + _SMALL[len(body)] + body if len(body) < 128 else _field(tag, body)


_FROM_CLIENT = _field(b"\x0a", b"l4gw.bytes.from_client") + b"\x12"
_TO_CLIENT = _field(b"\x0a", b"l4gw.bytes.to_client") + b"\x12"
_ADMITTED = _field(b"\x12", b"admitted")
_ATTEMPT = _field(b"\x12", b"connect_attempt")
_CLOSED = _field(b"\x12", b"closed")
_FAILURES = CloseReason.FAILURES
_SERVER_KEYS = frozenset(
    {
        "client.address",
        "client.port",
        "server.address",
        "server.port",
        "network.transport",
        "network.type",
        "l4gw.flow.id",
        "l4gw.bytes.from_client",
        "l4gw.bytes.to_client",
        "l4gw.close_reason",
        "l4gw.spliced",
        "l4gw.alpn",
        "error.type",
        "l4gw.error",
        *(name for name, _ in tf.OPTIONAL),
    }
)


def _error_status(message: str) -> bytes:
    """An error ``Status`` (a description only when there is one, as the SDK writes it)."""
    if not message:
        return _STATUS[2]
    return _field(b"\x7a", _field(b"\x12", message.encode()) + b"\x18\x02")


def _by_time(event: tuple[int, bytes]) -> int:
    return event[0]


class SpanEncoder:
    """Encodes batches of span records; one per exporter (not thread-safe)."""

    def __init__(self) -> None:
        self._kv: dict[tuple[str, type, Any], bytes] = {}
        self._keys: dict[str, bytes] = {}
        self._strings: dict[str, bytes] = {}
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[Scope, bytes] = {}
        self._groups: dict[Any, bytes] = {}
        """Encoded runs of attributes that repeat together (see :meth:`flow_span`)."""
        self._listeners: dict[int, tuple[Any, bytes]] = {}
        self._events: dict[Any, bytes] = {}
        self._attempts: dict[Any, tuple[bytes, bytes]] = {}

    def encode_records(self, records: Iterable[SpanRecord], resource: Any) -> bytes:
        """The serialized ``ExportTraceServiceRequest`` for ``records`` of one resource.

        Args:
            records: span records.
            resource: what emitted them (anything with ``attributes`` and
                ``schema_url``, such as the SDK's ``Resource``).
        """
        return self._resource_spans(resource, records)

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The serialized ``ExportTraceServiceRequest`` for SDK spans (any resources)."""
        grouped: dict[int, tuple[Any, list[SpanRecord]]] = {}
        for span in spans:
            resource = span.resource
            entry = grouped.get(id(resource))
            if entry is None:
                entry = grouped[id(resource)] = (resource, [])
            entry[1].append(from_readable(span))
        return b"".join(self._resource_spans(res, recs) for res, recs in grouped.values())

    def _resource_spans(self, resource: Any, records: Iterable[SpanRecord]) -> bytes:
        scopes: dict[Scope, list[bytes]] = {}
        for record in records:
            tag = record[0]
            if tag == tf.FLOW:
                scope, encoded_span = record[tf.F_SCOPE], self.flow_span(record)
            elif tag == tf.ATTEMPT:
                scope, encoded_span = record[tf.A_SCOPE], self.attempt_span(record)
            else:
                scope, encoded_span = record[REC_SCOPE], self.span(record)
            encoded = scopes.get(scope)
            if encoded is None:
                encoded = scopes[scope] = []
            encoded.append(encoded_span)
        # Lengths are summed, not measured on joined bytes: the request (a few
        # hundred KB) is joined once, with no copy per nesting level.
        body = [b"", self._resource(resource)]
        for scope, spans in scopes.items():
            head = len(body)
            body.append(b"")
            body.append(self._scope(scope))
            for encoded_span in spans:
                body.append(_header(b"\x12", len(encoded_span)))
                body.append(encoded_span)
            if scope[2]:
                body.append(_field(b"\x1a", scope[2].encode()))
            body[head] = _header(b"\x12", sum(map(len, body[head + 1 :])))
        if resource.schema_url:
            body.append(_field(b"\x1a", resource.schema_url.encode()))
        body[0] = _header(b"\x0a", sum(map(len, body)))
        return b"".join(body)

    def span(self, record: SpanRecord) -> bytes:
        """One ``Span`` message."""
        (
            name,
            kind,
            trace_id,
            span_id,
            parent_id,
            parent_remote,
            trace_state,
            start,
            end,
            attributes,
            events,
            links,
            status,
            message,
            _,
            dropped,
        ) = record
        parts = [
            b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
        ]
        if trace_state:
            parts.append(_field(b"\x1a", trace_state.encode()))
        if parent_id:
            parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
        parts.append(self._string(b"\x2a", name))
        parts.append(_KIND[kind])
        parts.append(b"\x39" + _pack_q(start) + b"\x41" + _pack_q(end))
        if attributes:
            parts.extend(self._attributes(b"\x4a", attributes))
        if dropped is not None and dropped[0]:
            parts.append(b"\x50" + _varint(dropped[0]))
        for i, (stamp, event_name, event_attributes) in enumerate(events):
            event = [b"\x09" + _pack_q(stamp), self._string(b"\x12", event_name)]
            if event_attributes:
                event.extend(self._attributes(b"\x1a", event_attributes))
            if dropped is not None and dropped[3][i]:
                event.append(b"\x20" + _varint(dropped[3][i]))
            parts.append(_field(b"\x5a", b"".join(event)))
        if dropped is not None and dropped[1]:
            parts.append(b"\x60" + _varint(dropped[1]))
        for link in links:
            parts.append(_field(b"\x6a", self._link(link)))
        if dropped is not None and dropped[2]:
            parts.append(b"\x70" + _varint(dropped[2]))
        if message:
            parts.append(
                _field(
                    b"\x7a",
                    _field(b"\x12", message.encode())
                    + (b"\x18" + _SMALL[status] if status else b""),
                )
            )
        else:
            parts.append(_STATUS[status])
        parts.append(_FLAGS_REMOTE if parent_id and parent_remote else _FLAGS_LOCAL)
        return b"".join(parts)

    # --- the gateway's own records, encoded without building their span first -------------
    #
    # Byte for byte what ``span(telemetry_flows.spans_of(record))`` writes (the
    # tests compare them), but the attributes that repeat together from one
    # connection to the next (the listener's; the destination's; the route,
    # cluster, endpoint and close reason) are each one cached run of bytes.

    def flow_span(self, r: Sequence[Any]) -> bytes:
        """The SERVER ``Span`` message of a flow record."""
        extra = r[tf.F_ATTRIBUTES]
        listener = r[tf.F_LISTENER]
        if r[tf.F_SNI] or (
            extra and not (_SERVER_KEYS.isdisjoint(extra) and listener.keys().isdisjoint(extra))
        ):
            # A plugin attribute replaces one of the span's own, or the SNI replaces the
            # listener's local address (flows.server_attributes): the general path.
            return self.span(tf.spans_of(r))
        parent_id = r[tf.F_PARENT_ID]
        start, end = r[tf.F_START], r[tf.F_END]
        parts = [b"\x0a\x10" + r[tf.F_TRACE_ID].to_bytes(16, "big")]
        parts.append(b"\x12\x08" + r[tf.F_SPAN_ID].to_bytes(8, "big"))
        if r[tf.F_STATE]:
            parts.append(_field(b"\x1a", r[tf.F_STATE].encode()))
        if parent_id:
            parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
        transport = r[tf.F_TRANSPORT]
        parts.append(self._string(b"\x2a", tf.span_name(transport)))
        parts.append(_KIND[1])
        parts.append(_pack_times(0x39, start, 0x41, max(start, end)))
        # Attributes, in the order of telemetry_flows.server_attributes.
        cached = self._listeners.get(id(listener))
        if cached is None or cached[0] is not listener:
            key = tuple(listener.items())
            run = self._groups.get(key)
            if run is None:
                run = self._remember(key, b"".join(self._attributes(b"\x4a", listener)))
            cached = self._listeners[id(listener)] = (listener, run)
            if len(self._listeners) > 64:  # one per message and listener: keep a few
                self._listeners = {id(listener): cached}
        parts.append(cached[1])
        client, destination = r[tf.F_CLIENT], r[tf.F_DESTINATION]
        parts.append(self._attribute(b"\x4a", "client.address", client[0]))
        parts.append(_int_attribute(b"\x4a", b"\x0a\x0bclient.port\x12", client[1]))
        ipv6 = ":" in client[0]
        key = (destination, transport, ipv6)
        run = self._groups.get(key)
        if run is None:
            attrs = {
                "server.address": destination[0],
                "server.port": destination[1],
                "network.transport": transport,
                "network.type": "ipv6" if ipv6 else "ipv4",
            }
            run = self._remember(key, b"".join(self._attributes(b"\x4a", attrs)))
        parts.append(run)
        parts.append(_int_attribute(b"\x4a", b"\x0a\x0cl4gw.flow.id\x12", r[tf.F_ID]))
        parts.append(_int_attribute(b"\x4a", _FROM_CLIENT, r[tf.F_FROM_CLIENT]))
        parts.append(_int_attribute(b"\x4a", _TO_CLIENT, r[tf.F_TO_CLIENT]))
        reason = r[tf.F_REASON]
        # Close reason, spliced and the optional values: one slice of the tuple.
        repeated = r[tf.F_REASON : tf.F_SNI + 1]
        run = self._groups.get(repeated)
        if run is None:
            attrs = {"l4gw.close_reason": reason, "l4gw.spliced": r[tf.F_SPLICED]}
            for name, i in tf.OPTIONAL:
                if r[i] is not None:
                    attrs[name] = r[i]
            run = self._remember(repeated, b"".join(self._attributes(b"\x4a", attrs)))
        parts.append(run)
        tail: dict[str, Any] = {}
        if r[tf.F_ALPN]:
            tail["l4gw.alpn"] = tuple(r[tf.F_ALPN])
        failed = reason in _FAILURES
        if failed:
            tail["error.type"] = reason
            if r[tf.F_ERROR]:
                tail["l4gw.error"] = r[tf.F_ERROR]
        if extra:
            tail.update(clean(extra))
        if tail:
            parts.extend(self._attributes(b"\x4a", tail))
        self._flow_events(r, end, parts)
        parts.append(_error_status(r[tf.F_ERROR] or reason) if failed else _STATUS[0])
        parts.append(_FLAGS_REMOTE if parent_id else _FLAGS_LOCAL)
        return b"".join(parts)

    def _flow_events(self, r: Sequence[Any], end: int, parts: list[bytes]) -> None:
        """Append the SERVER span's events, in time order, "closed" last."""
        events: list[tuple[int, bytes]] = []
        admitted = r[tf.F_ADMITTED]
        if admitted:
            events.append((admitted, _ADMITTED))
        flow_events = r[tf.F_EVENTS]
        if flow_events:
            times = r[tf.F_EVENT_TIMES] or ()
            for i, (name, attributes) in enumerate(flow_events):
                stamp = times[i] if i < len(times) else end
                events.append((stamp, self._event_body(name, attributes)))
        for attempt in r[tf.F_ATTEMPTS] or ():
            stamp, endpoint, error = (
                attempt[tf.AT_END],
                attempt[tf.AT_ENDPOINT],
                attempt[tf.AT_ERROR],
            )
            key = ("connect_attempt", endpoint, error)
            body = self._events.get(key)
            if body is None:
                ea: dict[str, Any] = {"l4gw.endpoint": endpoint}
                if error is not None:
                    ea["error"] = error
                body = self._remember_event(key, _ATTEMPT + b"".join(self._attributes(b"\x1a", ea)))
            events.append((stamp, body))
        events.sort(key=_by_time)
        reason = r[tf.F_REASON]
        closed = self._events.get(("closed", reason))
        if closed is None:
            attrs = self._attributes(b"\x1a", {"l4gw.close_reason": reason})
            closed = self._remember_event(("closed", reason), _CLOSED + b"".join(attrs))
        events.append((end, closed))
        for stamp, body in events:
            parts.append(_header(b"\x5a", 9 + len(body)))
            parts.append(_pack_event_time(9, stamp))  # field 1, fixed64: the time
            parts.append(body)

    def _event_body(self, name: Any, attributes: Any) -> bytes:
        """An event without its time: name and attributes.

        Remembered when every value is a string (the core's "routed", a
        plugin's labels): other types would need the type in the key (True
        == 1 hash alike), and their values vary more.
        """
        key: Any = None
        if not attributes:
            key = ("event", name)
        elif all(type(v) is str for v in attributes.values()):
            key = ("event", name, *attributes.items())
        if key is not None:
            body = self._events.get(key)
            if body is not None:
                return body
        encoded = [self._string(b"\x12", str(name))]
        cleaned = clean(attributes) if attributes else None
        if cleaned:
            encoded.extend(self._attributes(b"\x1a", cleaned))
        body = b"".join(encoded)
        if key is not None:
            self._remember_event(key, body)
        return body

    def attempt_span(self, r: Sequence[Any]) -> bytes:
        """The CLIENT ``Span`` message of an attempt record."""
        transport, cluster, error = r[tf.A_TRANSPORT], r[tf.A_CLUSTER], r[tf.A_ERROR]
        parts = [b"\x0a\x10" + r[tf.A_TRACE_ID].to_bytes(16, "big")]
        parts.append(b"\x12\x08" + r[tf.A_SPAN_ID].to_bytes(8, "big"))
        if r[tf.A_STATE]:
            parts.append(_field(b"\x1a", r[tf.A_STATE].encode()))
        parent_id = r[tf.A_PARENT_ID]
        if parent_id:
            parts.append(b"\x22\x08" + parent_id.to_bytes(8, "big"))
        key = (transport, cluster, r[tf.A_HOST], r[tf.A_PORT], r[tf.A_ENDPOINT], error)
        cached = self._attempts.get(key)
        if cached is None:
            attrs: dict[str, Any] = {
                "server.address": r[tf.A_HOST],
                "server.port": r[tf.A_PORT],
                "network.peer.address": r[tf.A_HOST],
                "network.peer.port": r[tf.A_PORT],
                "network.transport": transport,
                "l4gw.endpoint": r[tf.A_ENDPOINT],
            }
            if cluster is not None:
                attrs["l4gw.cluster"] = cluster
            if error is not None:
                attrs["error.type"] = CloseReason.CONNECT_FAILED
            if len(self._attempts) >= CACHE_SIZE:
                self._attempts.clear()
            cached = self._attempts[key] = (
                self._string(b"\x2a", f"{transport} connect {cluster}") + _KIND[2],
                b"".join(self._attributes(b"\x4a", attrs)),
            )
        # Name and kind, then the times, then the attributes.
        parts.append(cached[0])
        parts.append(_pack_times(0x39, r[tf.A_START], 0x41, r[tf.A_END]))
        parts.append(cached[1])
        parts.append(_STATUS[0] if error is None else _error_status(error))
        parts.append(_FLAGS_LOCAL)
        return b"".join(parts)

    def _remember(self, key: Any, encoded: bytes) -> bytes:
        if len(self._groups) >= CACHE_SIZE:
            self._groups.clear()
        self._groups[key] = encoded
        return encoded

    def _remember_event(self, key: Any, encoded: bytes) -> bytes:
        if len(self._events) >= CACHE_SIZE:
            self._events.clear()
        self._events[key] = encoded
        return encoded

    def _link(self, link: tuple[Any, ...]) -> bytes:
        trace_id, span_id, is_remote, _, attributes, dropped = link
        parts = [
            b"\x0a\x10" + trace_id.to_bytes(16, "big"),
            b"\x12\x08" + span_id.to_bytes(8, "big"),
        ]
        if attributes:
            parts.extend(self._attributes(b"\x22", attributes))
        if dropped:
            parts.append(b"\x28" + _varint(dropped))
        parts.append(b"\x35" + _pack_i(0x300 if is_remote else 0x100))
        return b"".join(parts)

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any]) -> list[bytes]:
        cache = self._kv
        keys = self._keys
        out = []
        for key, value in attributes.items():
            if type(value) is int and 0 <= value < _INT_LIMIT:
                # Counts, ports, ids: mostly unique, so not remembered (they would
                # push the repeated values out of the cache); the key is.
                prefix = keys.get(key)
                if prefix is None:
                    if len(keys) >= CACHE_SIZE:
                        keys.clear()
                    prefix = keys[key] = _field(b"\x0a", key.encode()) + b"\x12"
                number = b"\x18" + (_SMALL[value] if value < 128 else _varint(value))
                body = prefix + _SMALL[len(number)] + number
                out.append(tag + _SMALL[len(body)] + body if len(body) < 128 else _field(tag, body))
                continue
            # The type is part of the key: True == 1 and 1.0 == 1 hash alike.
            ck: tuple[str, type, Any] | None = (key, type(value), value)
            try:
                encoded = cache.get(ck)  # type: ignore[arg-type]
            except TypeError:  # an unhashable value (a list): not remembered
                ck, encoded = None, None
            if encoded is None:
                # Remembered without the field tag: span, event and link
                # attributes are different fields of the same KeyValue.
                encoded = _field(b"", _key_value(key, value))
                if ck is not None:
                    if len(cache) >= CACHE_SIZE:
                        cache.clear()
                    cache[ck] = encoded
            out.append(tag + encoded)
        return out

    def _attribute(self, tag: bytes, key: str, value: Any) -> bytes:
        """One attribute (a hashable value), through the cache."""
        ck = (key, type(value), value)
        encoded = self._kv.get(ck)
        if encoded is None:
            if len(self._kv) >= CACHE_SIZE:
                self._kv.clear()
            encoded = self._kv[ck] = _field(b"", _key_value(key, value))
        return tag + encoded

    def _string(self, tag: bytes, text: str) -> bytes:
        encoded = self._strings.get(text)
        if encoded is None:
            if len(self._strings) >= CACHE_SIZE:
                self._strings.clear()
            encoded = self._strings[text] = _field(b"", text.encode())
        return tag + encoded

    def _resource(self, resource: Any) -> bytes:
        cached = self._resources.get(id(resource))
        if cached is None or cached[0] is not resource:
            body = b"".join(
                _field(b"\x0a", _key_value(k, v)) for k, v in resource.attributes.items()
            )
            cached = self._resources[id(resource)] = (resource, _field(b"\x0a", body))
        return cached[1]

    def _scope(self, scope: Scope) -> bytes:
        encoded = self._scopes.get(scope)
        if encoded is None:
            name, version, _, attributes = scope
            body = b""
            if name:
                body += _field(b"\x0a", name.encode())
            if version:
                body += _field(b"\x12", version.encode())
            for key, value in attributes or ():
                body += _field(b"\x1a", _key_value(key, value))
            encoded = self._scopes[scope] = _field(b"\x0a", body)
        return encoded
