"""Spans and metrics of every flow of one process, kept as plain values on the trio thread.

The built-in telemetry plugin drives :class:`FlowTelemetry` from the hooks, one
call per hook:

* a flow opened: its SERVER span starts ("tcp proxy"/"udp proxy"), dated from the
  accept, its parent the W3C traceparent a trusted PROXY v2 header carried
  (``flow.traceparent_in``); ``flow.trace_id`` is set when the span is sampled
  (access logs print it);
* admitted (after every other plugin let it through): the "admitted" event;
* each upstream connect attempt: its CLIENT child span, back-dated by the
  attempt's duration, and its "connect_attempt" event go out with the flow's
  record. After a successful attempt to a cluster that sends PROXY v2 with a
  traceparent, ``flow.traceparent_out`` is that attempt's span, so the backend's
  span is a child of the connection that carried the header (W3C: the parent is
  the caller's outgoing span);
* closed: the final attributes (route, cluster, endpoint, bytes each way, close
  reason, spliced and tier, the refusing plugin and rule, and whatever plugins
  added with ``flow.set_attribute``), ``flow.events`` with their own timestamps,
  error status for the :attr:`CloseReason.FAILURES`, and the span ends.

The spans' exact content (names, attributes, events, status) is
:mod:`gateway.telemetry.flows`: the recorder captures plain values, the exporter
process makes the spans. The providers, exporters and the span pipe are
:mod:`gateway.telemetry.providers`.

Attribute names follow OpenTelemetry semantic conventions v1.44.0 for a proxy
(conventions.md A.2): ``client.*`` is the real client, ``server.*`` the
original destination it asked for, ``network.local.*`` the listener;
gateway-specific values live under ``l4gw.*``. Endpoint health
(``l4gw.endpoint.healthy``) is the health plugin's own gauge: it reaches the
same exporters through the global meter provider that telemetry installs.

Rules kept here:

* **Off is free.** With no exporter and no admin endpoint there is no
  recorder (:attr:`FlowTelemetry.recorder` is None) and each hook returns at its
  first line: no SDK is loaded, nothing is allocated.
* **The trio thread does bookkeeping, not telemetry.** Measured with the SDK
  as designed (an SDK ``Span`` per connection, a synchronous instrument call
  per measurement, a batch processor thread encoding and posting) telemetry
  cost several times what relaying a short connection costs
  (bench/telemetry_overhead.py; the SDK spends 7-10 µs per instrument call
  and validates every attribute under a lock, and an export thread competes
  with the loop for the GIL). So: the sampling decision is the SDK
  sampler's (or, for the file's ratio, the same comparison inline), but a
  sampled connection is kept as plain ints and handed on as one plain
  tuple of the values it already has (a flow record,
  :mod:`gateway.telemetry.flows`, with a short tuple per connect attempt)
  when it ends; the exporter *process* makes its spans, encodes and posts
  them. A connection that is not sampled keeps no trace state at all
  unless a cluster propagates traceparents. Counters are plain integers
  read by observable instruments, histograms are bucket arrays added to
  each collection. The cost per connection is a few dict operations and a
  few tuples; nothing is formatted, validated or logged for a connection
  that is not sampled.
* **A flow is recorded exactly once**: :meth:`Recorder.closed` pops it.
* **Metric attributes are bounded and never null.** Connection metrics carry
  listener, transport, route and cluster (:data:`FLOW_KEYS`), all from the
  config; the endpoint only on connect attempts, at most
  :data:`ENDPOINTS_PER_CLUSTER` per cluster; a value that is absent (no route
  yet, no rule, no error) leaves its attribute out (:func:`attributes`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gateway import __version__, discovery
from gateway.config import Config, Endpoint, TelemetryConfig
from gateway.flow import KERNEL_TIERS, CloseReason, Flow
from gateway.telemetry import providers as tel
from gateway.telemetry.flows import FLOW, ProcessorSink, span_name
from gateway.telemetry.histograms import Attributes, Histogram, histogram_metric
from gateway.telemetry.records import Scope, SpanRecord, format_trace_state

if TYPE_CHECKING:
    import trio
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics.export import Metric

__all__ = [
    "CONNECT_BUCKETS",
    "DURATION_BUCKETS",
    "ENDPOINTS_PER_CLUSTER",
    "SCOPE",
    "FlowTelemetry",
    "Recorder",
]

log = logging.getLogger("l4gw.telemetry")

_TRACE_ID_LIMIT = (1 << 64) - 1
"""TraceIdRatioBased compares the low 64 bits of the trace id with its bound."""
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
"""Connection lifetimes, seconds (conventions.md A.5: the SDK's default buckets are for ms)."""
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SCOPE: Scope = ("l4gw", __version__, tel.SCHEMA_URL, None)
"""The instrumentation scope of the plugin's spans."""
FLOW_KEYS = ("l4gw.listener", "network.transport", "l4gw.route", "l4gw.cluster")
"""The attributes of every connection metric (route and cluster absent until routed)."""
IO_KEYS = ("l4gw.listener", "l4gw.route", "l4gw.cluster", "network.io.direction")
ENDPOINTS_PER_CLUSTER = 32
"""Endpoints of one cluster that get their own ``l4gw.endpoint`` value on metrics (the
first seen among its current endpoints: an address that leaves the cluster's set gives
its label back); the others share :data:`OTHER_ENDPOINT`, so that a resolver returning
ever new addresses cannot grow the labels without bound."""
OTHER_ENDPOINT = "other"


def attributes(keys: tuple[str, ...], values: tuple[Any, ...]) -> Attributes:
    """Metric attributes from a series key: an absent value (None, "") is left out, never
    exported as "null" or an empty label."""
    return {k: v for k, v in zip(keys, values, strict=True) if v is not None and v != ""}


class _Trace:
    """What the recorder keeps of a traced flow (sampled, or propagated upstream)."""

    __slots__ = ("admitted", "attempts", "parent_id", "sampled", "span_id", "state", "trace_id")

    def __init__(
        self, trace_id: int, span_id: int, sampled: bool, state: str | None, parent_id: int
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        """The SERVER span's id."""
        self.sampled = sampled
        self.state = state
        """The sampler's W3C trace state, if any."""
        self.parent_id = parent_id
        """The span id of the traceparent received; 0 for a new trace."""
        self.admitted = 0
        self.attempts: list[tuple[Any, ...]] | None = None
        """Each connect attempt (``AT_*`` fields of :mod:`gateway.telemetry.flows`): its
        event and CLIENT span."""


class Recorder:
    """Spans and metrics for every flow of one process.

    Threads: the hooks run on the trio thread, the only writer of every map
    below; the metric readers (their own threads) take copies, each one a
    single C-level call under the GIL (``list(d.items())``), so no lock is
    taken per connection. A histogram series copied in the middle of an
    update reports its buckets' sum as its count; its sum, min and max may
    then include one observation its buckets do not yet, for that collection.
    """

    def __init__(self, telemetry: tel.Telemetry, config: Config) -> None:
        self.telemetry = telemetry
        self.start_ns = time.time_ns()
        self._live: dict[int, Flow] = {}
        """Open flows (``l4gw.io`` counts their bytes so far)."""
        self._traces: dict[int, _Trace] = {}
        self._refused: dict[tuple[Any, ...], int] = {}
        self._spliced: dict[tuple[Any, ...], int] = {}
        self._io_closed: dict[tuple[str, str | None, str | None], list[int]] = {}
        """Bytes of the closed flows by (listener, route, cluster): [from clients, to clients]."""
        self.duration = Histogram(
            "l4gw.connection.duration",
            "s",
            "Connection lifetime, accept to close",
            (*FLOW_KEYS, "l4gw.close_reason"),
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
        self._endpoints: dict[tuple[str, int], str] = {}
        self._endpoint_labels: dict[tuple[str, str, int], str] = {}
        """(cluster, host, port) -> its ``l4gw.endpoint`` value, at most
        :data:`ENDPOINTS_PER_CLUSTER` per cluster (the others are "other", uncached)."""
        self._endpoint_counts: dict[str, int] = {}
        # Labels follow each cluster's current set (DNS, files, plugins change it):
        # an address that left gives its label back, so live ones are never "other".
        self.unsubscribe = discovery.subscribe(self._endpoints_changed)
        self._traceparent_clusters: frozenset[str] = frozenset()
        self.reconfigure(config)
        self._ratio_bound: int | None = None
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

    def set_sample_ratio(self, ratio: float) -> bool:
        """Sample this share of new connections from now on (a reload changed it).

        Returns:
            False when the file's ratio is not the one in force: tracing is off,
            or ``OTEL_TRACES_SAMPLER`` chose the sampler.
        """
        if not self._tracing or self._ratio_bound is None:
            return False
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        self._ratio_bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self.telemetry.sample_ratio = ratio
        return True

    def _setup_tracing(self) -> bool:
        t = self.telemetry
        provider = t.tracer_provider
        if provider is None:
            return False
        emit: Callable[[SpanRecord], None]
        if t.span_processor is not None:
            emit = ProcessorSink(t.span_processor, provider.resource).add
        elif t.spans is not None:
            emit = t.spans.add
        else:
            return False
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
        from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

        from gateway.telemetry.context import FlowSpan

        self._emit = emit
        self._flow_span = FlowSpan
        self._sampler = provider.sampler
        if t.sample_ratio is not None:
            self._ratio_bound = TraceIdRatioBased.get_bound_for_rate(t.sample_ratio)
        ids = provider.id_generator
        if type(ids) is RandomIdGenerator:
            # Its own calls, without a Python frame (callers turn a zero id, invalid, into 1).
            self._trace_id: Callable[[], int] = functools.partial(random.getrandbits, 128)
            self._span_id: Callable[[], int] = functools.partial(random.getrandbits, 64)
        else:  # OTEL_PYTHON_ID_GENERATOR chose another
            self._trace_id, self._span_id = ids.generate_trace_id, ids.generate_span_id
        self._RECORD_AND_SAMPLE = Decision.RECORD_AND_SAMPLE
        return True

    def _setup_metrics(self) -> None:
        from opentelemetry.metrics import Observation

        meter = self.telemetry.meter
        assert meter is not None

        def observe(
            series: dict[Any, int], keys: tuple[str, ...]
        ) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                items = list(series.items())  # one atomic copy (see the class docstring)
                return [Observation(v, attributes(keys, k)) for k, v in items]

            return callback

        flow_keys = FLOW_KEYS
        meter.create_observable_up_down_counter(
            "l4gw.connection.active",
            [self._observe_active],
            unit="{connection}",
            description="Open connections (UDP: sessions)",
        )
        meter.create_observable_counter(
            "l4gw.connection.closed",
            [self._observe_closed],
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

    # --- hooks (the trio thread) -----------------------------------------------------------

    def opened(self, flow: Flow) -> None:
        self._live[flow.id] = flow
        if self._tracing:
            trace = self._start_trace(flow)
            if trace is not None:
                self._traces[flow.id] = trace

    def admitted(self, flow: Flow) -> None:
        trace = self._traces.get(flow.id)
        if trace is not None and trace.sampled:
            trace.admitted = time.time_ns()

    def connect_attempt(
        self, flow: Flow, endpoint: Endpoint, error: str | None, seconds: float
    ) -> None:
        address = self._endpoints.get((endpoint.host, endpoint.port))
        if address is None:
            if len(self._endpoints) > 4096:
                self._endpoints.clear()
            address = self._endpoints[(endpoint.host, endpoint.port)] = str(endpoint)
        cluster = flow.cluster or ""
        if self.metrics:
            failed = None if error is None else CloseReason.CONNECT_FAILED
            label = self._endpoint_labels.get((cluster, endpoint.host, endpoint.port))
            if label is None:
                label = self._endpoint_label(cluster, endpoint.host, endpoint.port, address)
            self.connect.record((flow.cluster, label, failed), seconds)
        trace = self._traces.get(flow.id)
        if trace is None:
            return
        propagate = error is None and cluster in self._traceparent_clusters
        span_id = trace.span_id
        if trace.sampled:
            # The attempt goes out with the flow record (gateway.telemetry.flows,
            # AT_* fields): the exporter makes its CLIENT span, and picks its
            # span id unless a traceparent names it now.
            span_id = (self._span_id() or 1) if propagate else 0
            attempt = (
                time.time_ns(),
                address,
                error,
                seconds,
                span_id,
                endpoint.host,
                endpoint.port,
                flow.cluster,
            )
            if trace.attempts is None:
                trace.attempts = [attempt]
            else:
                trace.attempts.append(attempt)
        if propagate:
            flow.traceparent_out = tel.format_traceparent(trace.trace_id, span_id, trace.sampled)

    def closed(self, flow: Flow) -> None:
        reason = flow.close_reason or CloseReason.INTERNAL_ERROR
        ended = flow.ended or time.time()
        listener, transport = flow.listener, flow.transport
        # False: closed before it opened (a bad PROXY header).
        opened = self._live.pop(flow.id, None) is not None
        if self.metrics:
            # The duration histogram's counts are the closed counter too.
            route, cluster = flow.route, flow.cluster
            key = (listener, transport, route, cluster, reason)
            self.duration.record(key, ended - flow.started)
            ik = (listener, route, cluster)
            io = self._io_closed.get(ik)
            if io is None:
                io = self._io_closed[ik] = [0, 0]
            io[0] += flow.bytes_from_client
            io[1] += flow.bytes_to_client
            if flow.refused_by is not None:
                rk = (*key, flow.refused_by, flow.refused_rule)
                self._refused[rk] = self._refused.get(rk, 0) + 1
            if flow.tier in KERNEL_TIERS:
                sk = (listener, transport, route, cluster, flow.tier)
                self._spliced[sk] = self._spliced.get(sk, 0) + 1
        if not self._tracing:
            return
        trace = self._traces.pop(flow.id, None) if opened else self._start_trace(flow)
        if trace is not None and trace.sampled:
            self._end_trace(flow, trace, reason, int(ended * 1e9))

    # --- spans -------------------------------------------------------------------------------

    def _start_trace(self, flow: Flow) -> _Trace | None:
        """The flow's trace, or None when nothing about it is recorded or propagated."""
        traceparent = flow.traceparent_in
        parent = tel.parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            trace_id, parent_id, flags = self._trace_id() or 1, 0, 0
        else:
            trace_id, parent_id, flags = parent
        state = None
        bound = self._ratio_bound
        if bound is not None:
            # The file's ParentBased(TraceIdRatioBased) decision, without the call:
            # a received parent decides, else the trace id against the ratio.
            sampled = bool(flags & 1) if parent_id else (trace_id & _TRACE_ID_LIMIT) < bound
        else:
            sampled, state = self._sample(flow, trace_id, parent_id, flags)
        if sampled:
            flow.trace_id = trace_id  # formatted when read (access log, /connections)
        elif not self._traceparent_clusters:
            return None  # not recorded, and no cluster to send a traceparent to
        span_id = self._span_id() or 1
        if sampled:
            # The current span during the flow's hooks (gateway/telemetry/context.py).
            flow.span = self._flow_span(flow, trace_id, span_id, state)
        return _Trace(trace_id, span_id, sampled, state, parent_id)

    def _sample(
        self, flow: Flow, trace_id: int, parent_id: int, flags: int
    ) -> tuple[bool, str | None]:
        """The SDK sampler's decision and trace state (``OTEL_TRACES_SAMPLER`` chose it)."""
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        context = None
        if parent_id:
            remote = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=TraceFlags(flags))
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        result = self._sampler.should_sample(
            context, trace_id, span_name(flow.transport), SpanKind.SERVER
        )
        sampled = result.decision is self._RECORD_AND_SAMPLE
        return sampled, format_trace_state(result.trace_state)

    def _end_trace(self, flow: Flow, trace: _Trace, reason: str, end: int) -> None:
        listener = self._listener_attrs.get(flow.listener)
        if listener is None:
            listener = self._listener_attrs[flow.listener] = self._listener_attributes(
                flow.listener
            )
        # A flow record (gateway.telemetry.flows, F_* fields): plain values,
        # the plugins' attributes and events as they left them.
        self._emit(
            (
                FLOW,
                listener,
                flow.transport,
                trace.trace_id,
                trace.span_id,
                trace.parent_id,
                trace.state,
                int(flow.started * 1e9),
                end,
                flow.client,
                flow.destination,
                flow.id,
                flow.bytes_from_client,
                flow.bytes_to_client,
                reason,
                flow.tier in KERNEL_TIERS,
                flow.tier,
                flow.route,
                flow.cluster,
                flow.endpoint,
                flow.refused_by,
                flow.refused_rule,
                flow.sni,
                flow.alpn or None,
                flow.error,
                flow.attributes or None,
                flow.events or None,
                flow.event_times or None,
                trace.admitted,
                trace.attempts,
                SCOPE,
            )
        )

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

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        """Open flows by listener, transport, route and cluster, counted now rather than
        kept up to date per connection; 0 for those with closed flows only."""
        from opentelemetry.metrics import Observation

        width = len(FLOW_KEYS)
        counts = {key[:width]: 0 for key in list(self.duration.series)}
        for flow in list(self._live.values()):
            key = (flow.listener, flow.transport, flow.route, flow.cluster)
            counts[key] = counts.get(key, 0) + 1
        return [Observation(n, attributes(FLOW_KEYS, key)) for key, n in counts.items()]

    def _observe_closed(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        keys = self.duration.keys
        return [
            Observation(int(s[0]), attributes(keys, k))
            for k, s in list(self.duration.series.items())
        ]

    def _observe_io(self, options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        totals: dict[tuple[Any, ...], int] = {}
        for (listener, route, cluster), (received, transmitted) in list(self._io_closed.items()):
            totals[(listener, route, cluster, "receive")] = received
            totals[(listener, route, cluster, "transmit")] = transmitted
        for flow in list(self._live.values()):
            if flow.bytes_from_client:
                key = (flow.listener, flow.route, flow.cluster, "receive")
                totals[key] = totals.get(key, 0) + flow.bytes_from_client
            if flow.bytes_to_client:
                key = (flow.listener, flow.route, flow.cluster, "transmit")
                totals[key] = totals.get(key, 0) + flow.bytes_to_client
        return [Observation(value, attributes(IO_KEYS, key)) for key, value in totals.items()]

    def _endpoints_changed(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        """Release the labels of ``cluster``'s endpoints that left its set (a series
        already exported keeps its counts; the label is free for a new address)."""
        live = {(e.host, e.port) for e in endpoints}
        gone = [key for key in self._endpoint_labels if key[0] == cluster and key[1:] not in live]
        for key in gone:
            del self._endpoint_labels[key]
        if gone:
            self._endpoint_counts[cluster] -= len(gone)

    def _endpoint_label(self, cluster: str, host: str, port: int, address: str) -> str:
        """The ``l4gw.endpoint`` value of a cluster's endpoint not labelled yet: its
        address while the cluster has fewer than :data:`ENDPOINTS_PER_CLUSTER`, else
        "other" (not cached, so the map stays bounded whatever a resolver returns)."""
        count = self._endpoint_counts.get(cluster, 0)
        if count >= ENDPOINTS_PER_CLUSTER:
            return OTHER_ENDPOINT
        self._endpoint_counts[cluster] = count + 1
        self._endpoint_labels[(cluster, host, port)] = address
        return address

    def _histograms(self) -> list[Metric]:
        data = [(h, h.snapshot()) for h in (self.duration, self.connect)]
        now = time.time_ns()
        return [histogram_metric(h, points, self.start_ns, now) for h, points in data if points]


# --- the process's flow telemetry across reloads -------------------------------------------


class FlowTelemetry:
    """The telemetry of one gateway process: set up once, reconfigured on reload.

    Args:
        setup: Builds the providers (:func:`gateway.telemetry.providers.setup`'s
            signature; tests pass their own).
    """

    def __init__(self, setup: Callable[..., tel.Telemetry | None] = tel.setup) -> None:
        self._setup = setup
        self.recorder: Recorder | None = None
        """None while telemetry is off (or not configured yet): nothing is recorded."""
        self._running: tuple[TelemetryConfig, bool] | None = None
        """The ``[telemetry]`` section in force and whether ``/metrics`` is collected."""

    def configure(self, config: Config) -> None:
        """Set telemetry up on the first call; later calls (reloads) update the recorder.

        A reload applies ``sample_ratio`` to the connections that follow; the
        exporters, the resource and the metric reader are built once per process,
        so the other ``[telemetry]`` keys, and turning ``[admin]`` on or off (which
        decides whether ``/metrics`` is collected), wait for a restart (a warning
        names them).
        """
        prometheus = config.admin is not None
        running = self._running
        if running is None:
            self._running = (config.telemetry, prometheus)
            telemetry = self._setup(
                config.telemetry, prometheus=prometheus, run_as=tel.run_as(config.gateway)
            )
            self.recorder = Recorder(telemetry, config) if telemetry is not None else None
            return
        recorder = self.recorder
        before, after = running[0], config.telemetry
        if after.sample_ratio != before.sample_ratio:
            if recorder is not None and recorder.set_sample_ratio(after.sample_ratio):
                log.info("telemetry: sample_ratio %s from now on", after.sample_ratio)
                running = (dataclasses.replace(before, sample_ratio=after.sample_ratio), running[1])
                self._running = running
            else:
                log.warning(
                    "telemetry: sample_ratio stays: tracing is off or OTEL_TRACES_SAMPLER chose "
                    "the sampler"
                )
        later = [
            f"[telemetry] {key}"
            for key in ("exporter", "service_name", "metrics_interval")
            if getattr(after, key) != getattr(before, key)
        ]
        if prometheus != running[1]:
            later.append("[admin] on or off (/metrics)")
        if later:
            log.warning("changes to %s take effect at the next restart", ", ".join(later))
        if recorder is not None:
            recorder.reconfigure(config)

    def start(self, nursery: trio.Nursery) -> None:
        """Start the task that sends partial span batches and reads the exporter's counts."""
        recorder = self.recorder
        if recorder is not None and recorder.telemetry.spans is not None:
            nursery.start_soon(recorder.telemetry.spans.run)

    def shutdown(self) -> None:
        """Deliver what telemetry holds, within ``EXIT_FLUSH_TIMEOUT``.

        Called once every connection has been recorded (the drain is over), and
        not only at exit: a worker process (``[gateway] workers``) ends with
        ``os._exit``, which runs no exit handlers. Blocking, once, after the
        last connection.
        """
        recorder = self.recorder
        if recorder is not None:
            recorder.unsubscribe()
            recorder.telemetry.shutdown()
