"""A fast OTLP trace encoder: span records to ``ExportTraceServiceRequest`` bytes.

Why it exists: the exporters' own encoder builds one protobuf object per
attribute, event and span in Python, several times the CPU of relaying a
short connection. This one writes the protobuf wire format directly from
span records (:mod:`gateway.telemetry_records`) and remembers the encoding of
every attribute it has seen (listener, route, cluster, endpoint, close
reason … repeat on every span), so most of a span is a few byte-string joins.
It runs in the exporter process, off the gateway's interpreter.

Rules kept here:

* **Byte-for-byte meaning of the SDK's encoder.** The same messages, fields
  and presence as ``opentelemetry.exporter.otlp.proto.common.trace_encoder``
  (status always present, trace state and parent only when set, span flags
  with the is-remote bits); ``tests/test_otlp_encode.py`` parses both and
  compares them for spans of every shape.
* **Bounded memory.** The attribute cache is cleared when it reaches
  :data:`CACHE_SIZE` entries (high-cardinality values such as ports simply
  stop being remembered for long).

Wire format reference: opentelemetry-proto ``trace/v1/trace.proto``,
``common/v1/common.proto``, ``resource/v1/resource.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .telemetry_records import REC_SCOPE, Scope, SpanRecord, from_readable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

CACHE_SIZE = 8192

_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
_pack_d = struct.Struct("<d").pack
_SMALL = [bytes((i,)) for i in range(128)]

# SDK SpanKind (INTERNAL=0, SERVER=1, ...) -> OTLP SpanKind (INTERNAL=1, SERVER=2, ...).
_KIND = [b"\x30" + _SMALL[i + 1] for i in range(5)]
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(0x300)  # ... | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_STATUS = [b"\x7a\x00", b"\x7a\x02\x18\x01", b"\x7a\x02\x18\x02"]
"""Status messages without a description, by code."""


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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


class SpanEncoder:
    """Encodes batches of span records; one per exporter (not thread-safe)."""

    def __init__(self) -> None:
        self._kv: dict[tuple[str, type, Any], bytes] = {}
        self._strings: dict[str, bytes] = {}
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[Scope, bytes] = {}

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
        span = self.span
        for record in records:
            scope = record[REC_SCOPE]
            encoded = scopes.get(scope)
            if encoded is None:
                encoded = scopes[scope] = []
            encoded.append(span(record))
        body = [self._resource(resource)]
        for scope, spans in scopes.items():
            scope_spans = [self._scope(scope)]
            scope_spans.extend(_field(b"\x12", s) for s in spans)
            if scope[2]:
                scope_spans.append(_field(b"\x1a", scope[2].encode()))
            body.append(_field(b"\x12", b"".join(scope_spans)))
        if resource.schema_url:
            body.append(_field(b"\x1a", resource.schema_url.encode()))
        return _field(b"\x0a", b"".join(body))

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
                    _field(b"\x12", message.encode()) + (b"\x18" + _SMALL[status] if status else b""),
                )
            )
        else:
            parts.append(_STATUS[status])
        parts.append(_FLAGS_REMOTE if parent_id and parent_remote else _FLAGS_LOCAL)
        return b"".join(parts)

    def _link(self, link: tuple[Any, ...]) -> bytes:
        trace_id, span_id, is_remote, _, attributes, dropped = link
        parts = [b"\x0a\x10" + trace_id.to_bytes(16, "big"), b"\x12\x08" + span_id.to_bytes(8, "big")]
        if attributes:
            parts.extend(self._attributes(b"\x22", attributes))
        if dropped:
            parts.append(b"\x28" + _varint(dropped))
        parts.append(b"\x35" + _pack_i(0x300 if is_remote else 0x100))
        return b"".join(parts)

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any]) -> list[bytes]:
        cache = self._kv
        out = []
        for key, value in attributes.items():
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
