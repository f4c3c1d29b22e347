"""Built-in telemetry: a span for every connection (or UDP session) and the gateway's metrics.

Everything goes through the hook contract, like any third-party plugin:

* ``l4gw_connection_opened`` starts the connection's SERVER span ("tcp
  proxy"/"udp proxy"), dated from the accept, its parent the W3C traceparent a
  trusted PROXY v2 header carried (``flow.trace_parent``); it sets
  ``flow.trace_id`` when the span is sampled (access logs print it).
* ``l4gw_admit`` (``trylast``: it runs only once every other plugin let the
  connection through, and never refuses) stamps the "admitted" event.
* ``l4gw_connect_attempt`` ends a CLIENT child span per upstream connect
  attempt, back-dated by the attempt's duration, and adds a
  "connect_attempt" event. After a successful attempt to a cluster that sends
  PROXY v2 with a traceparent it sets ``flow.traceparent_out`` to that
  attempt's span, so the backend's span is a child of the connection that
  carried the header (W3C: the parent is the caller's outgoing span).
* ``l4gw_connection_closed`` sets the final attributes (route, cluster,
  endpoint, bytes each way, close reason, spliced and tier, the refusing
  plugin and rule, and whatever plugins added with ``flow.set_attribute``),
  adds ``flow.events`` with their own timestamps, sets error status for the
  :attr:`CloseReason.FAILURES` and ends the span.

Attribute names follow OpenTelemetry semantic conventions v1.44.0 for a proxy
(conventions.md A.2): ``client.*`` is the real client, ``server.*`` the
original destination it asked for, ``network.local.*`` the listener;
gateway-specific values live under ``l4gw.*``. Endpoint health
(``l4gw.endpoint.healthy``) is the health plugin's own gauge: it reaches the
same exporters through the global meter provider that telemetry installs.

Rules kept here:

* **Off is free.** With no exporter and no admin endpoint each hook returns at
  its first line: no SDK is loaded, nothing is allocated.
* **The trio thread does bookkeeping, not telemetry.** Measured with the SDK
  as designed (an SDK ``Span`` per connection, a synchronous instrument call
  per measurement) telemetry cost several times what relaying a short
  connection costs (bench/telemetry_overhead.py; the SDK spends 7-10 µs per
  instrument call and validates every attribute under a lock). So: the
  sampling decision is the SDK sampler's, but a sampled connection is kept
  as plain values and handed to the batch processor as a finished
  ``ReadableSpan`` when it ends (the processor and exporters are the SDK's);
  counters are plain integers read by observable instruments, histograms are
  bucket arrays added to each collection. The cost per connection is a few
  dict operations; nothing is formatted, validated or logged for a
  connection that is not sampled.
* **A flow is recorded exactly once**: the closed hook pops it.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gateway import CloseReason, Config, Endpoint, Flow, __version__, hookimpl
from gateway import telemetry as tel

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics.export import Metric
    from opentelemetry.sdk.trace import Event
    from opentelemetry.trace import SpanContext

log = logging.getLogger("l4gw.telemetry")

Attributes = dict[str, Any]

_FAILURES = CloseReason.FAILURES
_TRACE_ID_LIMIT = (1 << 64) - 1
"""TraceIdRatioBased compares the low 64 bits of the trace id with its bound."""
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
"""Connection lifetimes, seconds (conventions.md A.5: the SDK's default buckets are for ms)."""
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# --- metrics aggregated without the SDK's instruments (pure, unit-tested) --------------------


class Histogram:
    """Explicit-bucket histogram series keyed by attribute values (OTel bucket rules:
    bucket i holds ``bounds[i-1] < v <= bounds[i]``; the last is the overflow)."""

    def __init__(
        self, name: str, unit: str, description: str, keys: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.keys = tuple(keys)
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[tuple[Any, ...], list[float]] = {}
        """values -> [count, sum, min, max, bucket 0, ..., bucket n]."""

    def record(self, values: tuple[Any, ...], value: float) -> None:
        s = self.series.get(values)
        if s is None:
            s = self.series[values] = [0, 0.0, value, value] + [0] * (len(self.bounds) + 1)
        s[0] += 1
        s[1] += value
        if value < s[2]:
            s[2] = value
        if value > s[3]:
            s[3] = value
        s[4 + bisect.bisect_left(self.bounds, value)] += 1

    def snapshot(self) -> list[tuple[Attributes, list[float]]]:
        return [(dict(zip(self.keys, k, strict=True)), list(s)) for k, s in self.series.items()]


def histogram_metric(
    h: Histogram, data: list[tuple[Attributes, list[float]]], start: int, now: int
) -> Metric:
    """One cumulative OTel histogram from a :meth:`Histogram.snapshot`."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint, Metric
    from opentelemetry.sdk.metrics.export import Histogram as HistogramData

    points = [
        HistogramDataPoint(
            attributes=attrs,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=int(s[0]),
            sum=s[1],
            bucket_counts=[int(c) for c in s[4:]],
            explicit_bounds=h.bounds,
            min=s[2],
            max=s[3],
        )
        for attrs, s in data
    ]
    return Metric(
        h.name, h.description, h.unit, HistogramData(points, AggregationTemporality.CUMULATIVE)
    )


class _Live:
    """What the recorder keeps of one open flow."""

    __slots__ = ("admitted", "attempts", "context", "flow", "key", "parent")

    def __init__(self, flow: Flow, key: tuple[str, str]) -> None:
        self.flow = flow
        self.key = key
        """(listener, transport): the series of ``l4gw.connection.active``."""
        self.context: SpanContext | None = None
        """The SERVER span's context; None when tracing is off."""
        self.parent: SpanContext | None = None
        self.admitted = 0
        self.attempts: list[tuple[int, str, str | None]] = []
        """(end ns, endpoint, error) of each connect attempt, for the events."""


class Recorder:
    """Spans and metrics for every flow of one process."""

    def __init__(self, telemetry: tel.Telemetry, config: Config) -> None:
        self.telemetry = telemetry
        self.start_ns = time.time_ns()
        self._lock = threading.Lock()
        """Guards every map below against the metric reader threads."""
        self._live: dict[int, _Live] = {}
        self._active: dict[tuple[str, str], int] = {}
        self._closed: dict[tuple[str, str, str], int] = {}
        self._refused: dict[tuple[str, str, str, str, str], int] = {}
        self._spliced: dict[tuple[str, str, str], int] = {}
        self._io_closed: dict[tuple[str, str], int] = {}
        self.duration = Histogram(
            "l4gw.connection.duration",
            "s",
            "Connection lifetime, accept to close",
            ("l4gw.listener", "network.transport", "l4gw.close_reason"),
            DURATION_BUCKETS,
        )
        self.connect = Histogram(
            "l4gw.upstream.connect.duration",
            "s",
            "Upstream connect attempts (error.type set when it failed)",
            ("l4gw.cluster", "l4gw.endpoint", "error.type"),
            CONNECT_BUCKETS,
        )
        self._listener_attrs: dict[str, Attributes] = {}
        self._attempt_names: dict[tuple[str, str | None], str] = {}
        self._traceparent_clusters: frozenset[str] = frozenset()
        self.reconfigure(config)
        self._tracing = self._setup_tracing()
        self.metrics = telemetry.meter is not None
        if self.metrics:
            self._setup_metrics()

    def reconfigure(self, config: Config) -> None:
        """A new configuration: listener attributes and PROXY-header clusters change."""
        self.config = config
        self._listener_attrs = {}
        self._traceparent_clusters = frozenset(
            name
            for name, c in config.clusters.items()
            if c.proxy_protocol == "v2" and c.proxy_protocol_traceparent
        )

    def _setup_tracing(self) -> bool:
        t = self.telemetry
        if t.tracer_provider is None or t.span_processor is None:
            return False
        from opentelemetry import trace
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        provider = t.tracer_provider
        self._sampler = provider.sampler
        self._ratio_bound: int | None = None
        if t.sample_ratio is not None:
            self._ratio_bound = TraceIdRatioBased.get_bound_for_rate(t.sample_ratio)
        self._ids = provider.id_generator
        self._resource = provider.resource
        self._on_end = t.span_processor.on_end
        self._scope = InstrumentationScope("l4gw", __version__, tel.SCHEMA_URL)
        self._SpanContext = SpanContext
        self._ReadableSpan = ReadableSpan
        self._Event = Event
        self._Status = Status
        self._ERROR = StatusCode.ERROR
        self._OK = Status(StatusCode.UNSET)
        self._SERVER, self._CLIENT = SpanKind.SERVER, SpanKind.CLIENT
        self._SAMPLED = TraceFlags(TraceFlags.SAMPLED)
        self._NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
        self._NonRecordingSpan = NonRecordingSpan
        self._RECORD_AND_SAMPLE = Decision.RECORD_AND_SAMPLE
        self._set_span_in_context = trace.set_span_in_context
        return True

    def _setup_metrics(self) -> None:
        from opentelemetry.metrics import Observation

        meter = self.telemetry.meter
        assert meter is not None

        def observe(
            series: dict[Any, int], keys: tuple[str, ...]
        ) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                with self._lock:
                    items = list(series.items())
                return [Observation(v, dict(zip(keys, k, strict=True))) for k, v in items]

            return callback

        flow_keys = ("l4gw.listener", "network.transport")
        meter.create_observable_up_down_counter(
            "l4gw.connection.active",
            [observe(self._active, flow_keys)],
            unit="{connection}",
            description="Open connections (UDP: sessions)",
        )
        meter.create_observable_counter(
            "l4gw.connection.closed",
            [observe(self._closed, (*flow_keys, "l4gw.close_reason"))],
            unit="{connection}",
            description="Connections ended, by close reason",
        )
        meter.create_observable_counter(
            "l4gw.connection.refused",
            [
                observe(
                    self._refused,
                    (*flow_keys, "l4gw.close_reason", "l4gw.refused_by", "l4gw.refused_rule"),
                )
            ],
            unit="{connection}",
            description="Connections refused, by plugin and rule",
        )
        meter.create_observable_counter(
            "l4gw.connection.spliced",
            [observe(self._spliced, (*flow_keys, "l4gw.tier"))],
            unit="{connection}",
            description="Connections whose bytes a kernel tier moved",
        )
        meter.create_observable_counter(
            "l4gw.io",
            [self._observe_io],
            unit="By",
            description="Payload bytes, receive = from clients, transmit = to clients "
            "(open connections included)",
        )
        self.telemetry.metric_producers.append(self._histograms)

    # --- hooks -----------------------------------------------------------------------------

    def opened(self, flow: Flow) -> None:
        key = (flow.listener, flow.transport)
        live = _Live(flow, key)
        if self._tracing:
            self._start_trace(flow, live)
        with self._lock:
            self._live[flow.id] = live
            self._active[key] = self._active.get(key, 0) + 1

    def admitted(self, flow: Flow) -> None:
        live = self._live.get(flow.id)
        if live is not None and live.context is not None and live.context.trace_flags.sampled:
            live.admitted = time.time_ns()

    def connect_attempt(
        self, flow: Flow, endpoint: Endpoint, error: str | None, seconds: float
    ) -> None:
        cluster = flow.cluster or ""
        if self.metrics:
            with self._lock:
                self.connect.record(
                    (cluster, str(endpoint), None if error is None else CloseReason.CONNECT_FAILED),
                    seconds,
                )
        live = self._live.get(flow.id)
        if live is None or live.context is None:
            return
        context = live.context
        if context.trace_flags.sampled:
            end = time.time_ns()
            context = self._attempt_span(flow, live, endpoint, error, end - int(seconds * 1e9), end)
        if error is None and cluster in self._traceparent_clusters:
            flow.traceparent_out = tel.format_traceparent(
                context.trace_id, context.span_id, context.trace_flags.sampled
            )

    def closed(self, flow: Flow) -> None:
        reason = flow.close_reason or CloseReason.INTERNAL_ERROR
        ended = flow.ended or time.time()
        listener, transport = flow.listener, flow.transport
        from_client, to_client = flow.bytes_from_client, flow.bytes_to_client
        with self._lock:
            live = self._live.pop(flow.id, None)
            if live is not None:
                self._active[live.key] -= 1
            if self.metrics:
                key = (listener, transport, reason)
                self._closed[key] = self._closed.get(key, 0) + 1
                self.duration.record(key, ended - flow.started)
                if from_client:
                    k = (listener, "receive")
                    self._io_closed[k] = self._io_closed.get(k, 0) + from_client
                if to_client:
                    k = (listener, "transmit")
                    self._io_closed[k] = self._io_closed.get(k, 0) + to_client
                if flow.refused_by is not None:
                    rk = (listener, transport, reason, flow.refused_by, flow.refused_rule or "")
                    self._refused[rk] = self._refused.get(rk, 0) + 1
                if flow.spliced:
                    sk = (listener, transport, flow.tier or "")
                    self._spliced[sk] = self._spliced.get(sk, 0) + 1
        if not self._tracing:
            return
        if live is None:
            # Closed before it opened (a bad PROXY header): a span all the same.
            live = _Live(flow, (listener, transport))
            self._start_trace(flow, live)
        if live.context is not None and live.context.trace_flags.sampled:
            self._end_trace(flow, live, reason, int(ended * 1e9))

    # --- spans -------------------------------------------------------------------------------

    def _start_trace(self, flow: Flow, live: _Live) -> None:
        parent = _remote_parent(self, flow.trace_parent) if flow.trace_parent else None
        if parent is None:
            context, trace_id = None, self._ids.generate_trace_id()
        else:
            context = self._set_span_in_context(self._NonRecordingSpan(parent))
            trace_id = parent.trace_id
        bound = self._ratio_bound
        if bound is not None:
            # The file's ParentBased(TraceIdRatioBased) decision, without the call:
            # a received parent decides, else the trace id against the ratio.
            if parent is not None:
                sampled = parent.trace_flags.sampled
            else:
                sampled = (trace_id & _TRACE_ID_LIMIT) < bound
            state = None
        else:
            result = self._sampler.should_sample(context, trace_id, _span_name(flow), self._SERVER)
            sampled = result.decision is self._RECORD_AND_SAMPLE
            state = result.trace_state
        live.parent = parent
        live.context = self._SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=self._SAMPLED if sampled else self._NOT_SAMPLED,
            trace_state=state,
        )
        if sampled:
            flow.trace_id = format(trace_id, "032x")

    def _attempt_span(
        self, flow: Flow, live: _Live, endpoint: Endpoint, error: str | None, start: int, end: int
    ) -> SpanContext:
        assert live.context is not None
        key = (flow.transport, flow.cluster)
        name = self._attempt_names.get(key)
        if name is None:
            name = self._attempt_names[key] = f"{flow.transport} connect {flow.cluster}"
        context = self._SpanContext(
            live.context.trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=live.context.trace_flags,
            trace_state=live.context.trace_state,
        )
        attrs: Attributes = {
            "server.address": endpoint.host,
            "server.port": endpoint.port,
            "network.peer.address": endpoint.host,
            "network.peer.port": endpoint.port,
            "network.transport": flow.transport,
            "l4gw.endpoint": str(endpoint),
        }
        if flow.cluster is not None:
            attrs["l4gw.cluster"] = flow.cluster
        status = self._OK
        if error is not None:
            attrs["error.type"] = CloseReason.CONNECT_FAILED
            status = self._Status(self._ERROR, error)
        self._on_end(
            self._ReadableSpan(
                name,
                context,
                live.context,
                self._resource,
                attrs,
                (),
                (),
                self._CLIENT,
                None,
                status,
                start,
                end,
                self._scope,
            )
        )
        live.attempts.append((end, attrs["l4gw.endpoint"], error))
        return context

    def _end_trace(self, flow: Flow, live: _Live, reason: str, end: int) -> None:
        Event = self._Event
        events: list[Any] = []
        if live.admitted:
            events.append(Event("admitted", None, live.admitted))
        times = flow.event_times
        for i, (name, attributes) in enumerate(flow.events):
            stamp = times[i] if i < len(times) else end
            events.append(Event(name, _clean(attributes) or None, stamp))
        for stamp, endpoint, error in live.attempts:
            ea: Attributes = {"l4gw.endpoint": endpoint}
            if error is not None:
                ea["error"] = error
            events.append(Event("connect_attempt", ea, stamp))
        events.sort(key=_timestamp)
        events.append(Event("closed", {"l4gw.close_reason": reason}, end))
        status = self._OK
        if reason in _FAILURES:
            status = self._Status(self._ERROR, flow.error or reason)
        start = int(flow.started * 1e9)
        self._on_end(
            self._ReadableSpan(
                _span_name(flow),
                live.context,
                live.parent,
                self._resource,
                self._attributes(flow, reason),
                events,
                (),
                self._SERVER,
                None,
                status,
                start,
                max(start, end),
                self._scope,
            )
        )

    def _attributes(self, flow: Flow, reason: str) -> Attributes:
        base = self._listener_attrs.get(flow.listener)
        if base is None:
            base = self._listener_attrs[flow.listener] = self._listener_attributes(flow.listener)
        attrs = base.copy()
        client, destination = flow.client, flow.destination
        attrs["client.address"] = client[0]
        attrs["client.port"] = client[1]
        attrs["server.address"] = destination[0]
        attrs["server.port"] = destination[1]
        attrs["network.transport"] = flow.transport
        attrs["network.type"] = "ipv6" if ":" in client[0] else "ipv4"
        attrs["l4gw.flow.id"] = flow.id
        attrs["l4gw.bytes.from_client"] = flow.bytes_from_client
        attrs["l4gw.bytes.to_client"] = flow.bytes_to_client
        attrs["l4gw.close_reason"] = reason
        attrs["l4gw.spliced"] = flow.spliced
        if flow.route is not None:
            attrs["l4gw.route"] = flow.route
        if flow.cluster is not None:
            attrs["l4gw.cluster"] = flow.cluster
        if flow.endpoint is not None:
            attrs["l4gw.endpoint"] = flow.endpoint
        if flow.tier is not None:
            attrs["l4gw.tier"] = flow.tier
        if flow.refused_by is not None:
            attrs["l4gw.refused_by"] = flow.refused_by
        if flow.refused_rule is not None:
            attrs["l4gw.refused_rule"] = flow.refused_rule
        if flow.sni is not None:
            attrs["tls.client.server_name"] = flow.sni
        if flow.alpn:
            attrs["l4gw.alpn"] = tuple(flow.alpn)
        if reason in _FAILURES:
            attrs["error.type"] = reason
            if flow.error:
                attrs["l4gw.error"] = flow.error
        if flow.attributes:
            for key, value in flow.attributes.items():
                cleaned = _clean_value(value)
                if cleaned is not None:
                    attrs[key] = cleaned
        return attrs

    def _listener_attributes(self, name: str) -> Attributes:
        attrs: Attributes = {"l4gw.listener": name}
        try:
            lc = self.config.listener(name)
        except KeyError:
            return attrs
        attrs["network.local.address"] = lc.host
        attrs["network.local.port"] = lc.port
        if lc.transparent:
            attrs["l4gw.transparent"] = True
        return attrs

    # --- metric collection (reader threads) ------------------------------------------------

    def _observe_io(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        with self._lock:
            totals = dict(self._io_closed)
            for live in self._live.values():
                flow = live.flow
                if flow.bytes_from_client:
                    key = (flow.listener, "receive")
                    totals[key] = totals.get(key, 0) + flow.bytes_from_client
                if flow.bytes_to_client:
                    key = (flow.listener, "transmit")
                    totals[key] = totals.get(key, 0) + flow.bytes_to_client
        return [
            Observation(value, {"l4gw.listener": listener, "network.io.direction": direction})
            for (listener, direction), value in totals.items()
        ]

    def _histograms(self) -> list[Metric]:
        with self._lock:
            data = [(h, h.snapshot()) for h in (self.duration, self.connect)]
        now = time.time_ns()
        return [histogram_metric(h, points, self.start_ns, now) for h, points in data if points]


def _span_name(flow: Flow) -> str:
    return "udp proxy" if flow.transport == "udp" else "tcp proxy"


def _timestamp(event: Event) -> int:
    return event.timestamp


def _remote_parent(recorder: Recorder, traceparent: str) -> SpanContext | None:
    """The span context of a received traceparent (None when it is invalid)."""
    parsed = tel.parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    return recorder._SpanContext(
        trace_id,
        span_id,
        is_remote=True,
        trace_flags=recorder._SAMPLED if flags & 1 else recorder._NOT_SAMPLED,
    )


_PRIMITIVES = (str, bool, int, float)


def _clean_value(value: Any) -> Any:
    """An attribute value OpenTelemetry accepts (primitive or homogeneous sequence), or None.

    Plugins may pass anything to ``flow.set_attribute``/``add_event``; the SDK's
    exporter would drop an unsupported value with a log line per span.
    """
    if isinstance(value, _PRIMITIVES):
        return value
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return tuple(value)
        return tuple(str(v) for v in value)
    return str(value)


def _clean(attributes: Mapping[str, Any]) -> Attributes:
    out: Attributes = {}
    for key, value in attributes.items():
        cleaned = _clean_value(value)
        if cleaned is not None:
            out[key] = cleaned
    return out


# --- the plugin ------------------------------------------------------------------------------

_recorder: Recorder | None = None
_configured: Config | None = None


@hookimpl
def l4gw_configure(config: Config) -> None:
    """Set telemetry up on the first call; later calls (reloads) update the recorder."""
    global _recorder, _configured
    if _configured is None:
        _configured = config
        telemetry = tel.setup(config.telemetry, prometheus=config.admin is not None)
        _recorder = Recorder(telemetry, config) if telemetry is not None else None
        return
    if config.telemetry != _configured.telemetry or (config.admin is None) != (
        _configured.admin is None
    ):
        log.warning("[telemetry] and [admin] changes take effect at the next restart")
    if _recorder is not None:
        _recorder.reconfigure(config)


@hookimpl
def l4gw_connection_opened(flow: Flow) -> None:
    recorder = _recorder
    if recorder is not None:
        recorder.opened(flow)


@hookimpl(trylast=True)
def l4gw_admit(flow: Flow) -> None:
    recorder = _recorder
    if recorder is not None:
        recorder.admitted(flow)


@hookimpl
def l4gw_connect_attempt(flow: Flow, endpoint: Endpoint, error: str | None, seconds: float) -> None:
    recorder = _recorder
    if recorder is not None:
        recorder.connect_attempt(flow, endpoint, error, seconds)


@hookimpl
def l4gw_connection_closed(flow: Flow) -> None:
    recorder = _recorder
    if recorder is not None:
        recorder.closed(flow)
