"""OpenTelemetry SDK set-up for one gateway process: providers, exporters, sampling.

The flow telemetry (:class:`gateway.telemetry.recorder.FlowTelemetry`, driven by
the telemetry plugin) calls :func:`setup` once with the ``[telemetry]`` section;
the admin endpoint reads :func:`current` for ``/metrics``. The spans and
instruments of flows are :mod:`gateway.telemetry.recorder`.

Rules kept here:

* **Off costs nothing.** With no exporter for either signal and no admin
  endpoint, :func:`setup` returns None without importing the SDK, and the
  plugin records nothing per connection.
* **Span export runs in a process of its own.** Finished spans are plain
  records (:mod:`gateway.telemetry.flows`, :mod:`gateway.telemetry.records`)
  that the trio thread sends in batches to the exporter process
  (:mod:`gateway.telemetry.pipe`, :mod:`gateway.telemetry.exporter`), which
  makes, encodes and posts the spans: no export thread in the gateway
  competes with the loop for the GIL (that cost a quarter to a third of the
  connections per second, docs/observability.md).
  Metrics stay in-process: observable instruments read plain counters, a
  periodic reader (its own thread) exports them, and ``/metrics`` is pulled
  from a worker thread. Nothing here calls ``force_flush`` on the loop
  (conventions.md A.9).
* **Several workers, one set of metrics.** With ``[gateway] workers > 1`` worker
  0 alone serves ``/metrics`` and exports, each collection the sum of every
  worker's report (:meth:`Telemetry.inject`, :mod:`gateway.telemetry.aggregate`,
  :mod:`gateway.peers`); the other workers only answer it, from one in-memory
  reader. A worker's report includes the last one of the process it replaced,
  so counters never go backwards across restarts.
* **A collector that is down costs spans, never service.** The span queue is
  bounded; a span that would overflow it, and every span of a batch the
  exporter could not deliver, is counted (``l4gw.telemetry.spans.dropped``) and
  a warning says so at most once per
  :data:`gateway.telemetry.stats.WARN_INTERVAL`. The exporters' own
  per-batch error lines are folded into that warning. At exit the final
  flush has :data:`EXIT_FLUSH_TIMEOUT`, and a failing exporter is cut short
  instead of retrying for its whole timeout.
* **The standard variables win over the file**, as the OpenTelemetry spec asks:
  ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER`` (otlp, console, none),
  ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL`` (grpc, http/protobuf),
  ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_SERVICE_NAME``,
  ``OTEL_METRIC_EXPORT_INTERVAL``; endpoint, headers, timeout, compression and
  TLS variables are read by the OTLP exporters themselves.
  ``OTEL_SDK_DISABLED=true`` turns off every span and every exported metric
  (``/metrics`` on the admin endpoint, configured in the file, stays).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.config import GatewayConfig, TelemetryConfig
from gateway.identity import resolve_identity
from gateway.telemetry.stats import ExportStats, fold_exporter_logs

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        InMemoryMetricReader,
        Metric,
        MetricExporter,
        MetricsData,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Tracer
    from prometheus_client import CollectorRegistry

    from gateway.peers import Link
    from gateway.telemetry.metrics import CountingMetricExporter
    from gateway.telemetry.pipe import ExporterPipe

log = logging.getLogger("l4gw.telemetry")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
"""Semantic conventions the attributes follow (opentelemetry-python 1.45 ships v1.44.0)."""

EXIT_FLUSH_TIMEOUT = 5.0
"""Seconds a stopping gateway gives telemetry to deliver what it holds."""

PEER_TIMEOUT = 2.0
"""Seconds worker 0 waits for the other workers' metrics at a collection."""

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "http/protobuf"
"""The spec's default OTLP transport for SDKs."""

DEFAULT_QUEUE_SIZE = 2048
"""Spans waiting for export (the SDK's default, ``OTEL_BSP_MAX_QUEUE_SIZE``)."""

DEFAULT_BATCH_SIZE = 512
"""Spans per export request (the SDK's default, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``)."""

DEFAULT_SCHEDULE_DELAY = 5.0
"""Seconds a partial batch waits (the SDK's default, ``OTEL_BSP_SCHEDULE_DELAY`` = 5000 ms)."""

EXPORTER_NICE = 5
"""Niceness of the exporter process: under CPU contention the relay comes first,
spans wait (and are counted as dropped if the queue overflows)."""

# --- decisions on plain values (unit-tested) ----------------------------------------------------


def signal_exporter(signal: str, configured: str, env: Mapping[str, str]) -> str:
    """Which exporter a signal uses: ``OTEL_<SIGNAL>_EXPORTER`` or else the file's.

    Args:
        signal: "traces" or "metrics".
        configured: ``[telemetry] exporter``.
        env: the environment.

    Returns:
        "otlp", "console" or "none". An unsupported value in the variable is
        logged and the file's choice kept.
    """
    raw = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if not raw:
        return configured
    # The variable may list several exporters; one per signal is supported.
    first = raw.split(",")[0].strip()
    if first in EXPORTERS:
        return first
    log.warning(
        "OTEL_%s_EXPORTER=%r is not one of %s; using %r",
        signal.upper(),
        raw,
        ", ".join(EXPORTERS),
        configured,
    )
    return configured


def otlp_protocol(signal: str, env: Mapping[str, str]) -> str:
    """The OTLP transport of a signal: the per-signal variable, the general one, the default.

    Raises:
        ValueError: a value other than "grpc" or "http/protobuf" (``http/json``
            has no Python exporter).
    """
    raw = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or DEFAULT_PROTOCOL
    ).strip()
    if raw not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {raw!r} is not supported (use grpc or http/protobuf)")
    return raw


def metric_interval_ms(config: TelemetryConfig, env: Mapping[str, str]) -> float:
    """``OTEL_METRIC_EXPORT_INTERVAL`` (ms) when set and valid, else ``metrics_interval``."""
    raw = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
        log.warning("OTEL_METRIC_EXPORT_INTERVAL=%r is not a positive number of ms", raw)
    return config.metrics_interval * 1000.0


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


def queue_size(env: Mapping[str, str]) -> int:
    """``OTEL_BSP_MAX_QUEUE_SIZE`` when valid, else the SDK's default."""
    return int(_positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE_SIZE))


def batch_size(env: Mapping[str, str]) -> int:
    """``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` when valid (at most the queue size), else the SDK's."""
    size = int(_positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_BATCH_SIZE))
    return min(size, queue_size(env))


def schedule_delay(env: Mapping[str, str]) -> float:
    """``OTEL_BSP_SCHEDULE_DELAY`` (ms) in seconds when valid, else the SDK's default."""
    return _positive(env, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY * 1000) / 1000


_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_traceparent(text: str) -> tuple[int, int, int] | None:
    """A W3C traceparent as (trace id, span id, flags), or None when it is not valid.

    Follows W3C Trace Context level 1: version ``ff`` and all-zero ids are
    invalid; a future version may carry more fields after the four known ones.
    A bad value only loses the parent: it never costs the connection.
    """
    m = _TRACEPARENT.match(text.strip())
    if m is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags_hex, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    """The W3C traceparent (version 00) for a span context."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


# --- the process's telemetry -----------------------------------------------------------------


@dataclass
class Telemetry:
    """The process's providers and what the plugin and the admin endpoint read."""

    config: TelemetryConfig
    traces: str
    """Span exporter in use: "otlp", "console" or "none"."""
    metrics: str
    """Metric exporter in use: "otlp", "console" or "none" (``/metrics`` works regardless)."""
    tracer: Tracer | None
    meter: Meter | None
    stats: ExportStats
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    registry: CollectorRegistry | None = None
    """Prometheus registry behind ``/metrics`` (None without the admin endpoint)."""
    resource: Resource | None = None
    sample_ratio: float | None = None
    """The ratio of the parent-based sampler built from the file; None when
    ``OTEL_TRACES_SAMPLER`` chose another (then only the SDK's sampler decides)."""
    spans: ExporterPipe | None = None
    """Where finished span records go: batched to the exporter process."""
    span_processor: SpanProcessor | None = None
    """An SDK span processor to hand spans to instead of :attr:`spans` (tests drive
    the plugin against the SDK's in-memory exporter this way)."""
    metric_producers: list[Callable[[], Sequence[Metric]]] = field(default_factory=list)
    """Called at each collection, on the reader's thread: metrics aggregated outside
    the SDK's instruments (the plugin's histograms), added to the "l4gw" scope."""
    link: Link | None = None
    """This worker's link to the others (``[gateway] workers > 1``): worker 0 sums every
    worker's metrics at each collection (:meth:`inject`), the others answer with
    :meth:`worker_report`."""
    snapshot: InMemoryMetricReader | None = None
    """The reader :meth:`worker_report` collects (workers other than 0, which neither
    serve ``/metrics`` nor export)."""
    processes: dict[int, dict[str, float]] = field(default_factory=dict)
    """Worker 0 of several: each worker's ``process_*`` samples, from the last collection
    (``/metrics`` shows them per worker)."""
    _exporters: list[CountingMetricExporter] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def inject(self, data: MetricsData | None) -> MetricsData | None:
        """``data`` with the producers' metrics added to the "l4gw" scope; in worker 0 of
        several, the sum of every worker's (:mod:`gateway.telemetry.aggregate`).
        Blocking (it may ask the other workers): called on the readers' threads."""
        data = self._produce(data)
        if self.link is not None and self.link.index == 0:
            data = self._all_workers(data)
        return data

    def worker_report(self, data: MetricsData | None = None) -> dict[str, Any]:
        """This worker's metrics as a plain report, with those of the process it
        replaced added, stored in its slot before it is returned
        (:mod:`gateway.peers`, rule 4). Blocking: call from a thread."""
        from gateway.telemetry import aggregate

        if data is None:
            data = self._produce(
                self.snapshot.get_metrics_data() if self.snapshot is not None else None
            )
        own = aggregate.families(data)
        link = self.link
        previous = link.previous if link is not None else None
        if previous:
            own = aggregate.merge(
                [(None, aggregate.cumulative(previous.get("metrics", []))), (None, own)]
            )
        process: dict[str, float] = {}
        if link is not None:
            from gateway.telemetry.metrics import process_samples

            process = process_samples()
            before = (previous or {}).get("process", {}).get("process_cpu_seconds_total")
            if before is not None and "process_cpu_seconds_total" in process:
                process["process_cpu_seconds_total"] += before  # carries over, as counters do
        report = {"pid": os.getpid(), "metrics": own, "process": process}
        if link is not None:
            link.save(report)
        return report

    def _all_workers(self, data: MetricsData | None) -> MetricsData:
        """Worker 0's collection: its report and every other worker's, summed; for a
        worker that does not answer in time, its last stored report's counters."""
        import time

        from gateway.telemetry import aggregate

        link = self.link
        assert link is not None
        own = self.worker_report(data)
        reports = [(0, own["metrics"])]
        process = {0: own["process"]}
        for index, answer in sorted(link.query("metrics", PEER_TIMEOUT).items()):
            if answer is None:
                last = link.last(index)
                reports.append((index, aggregate.cumulative(last["metrics"]) if last else []))
            else:
                reports.append((index, answer.get("metrics", [])))
                process[index] = answer.get("process", {})
        self.processes = process
        from opentelemetry.sdk.resources import Resource

        resource = self.resource if self.resource is not None else Resource.create({})
        return aggregate.metrics_data(
            aggregate.merge(reports), resource, link.started_ns, time.time_ns()
        )

    def _produce(self, data: MetricsData | None) -> MetricsData | None:
        """``data`` with the producers' metrics added to the "l4gw" scope."""
        if not self.metric_producers or self.meter_provider is None:
            return data
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        extra: list[Metric] = []
        for produce in self.metric_producers:
            try:
                extra.extend(produce())
            except Exception:
                log.exception("telemetry: a metric producer failed")
        if not extra:
            return data
        if data is None or not data.resource_metrics:
            from opentelemetry.sdk.resources import Resource

            resource = self.resource if self.resource is not None else Resource.create({})
            data = MetricsData([ResourceMetrics(resource, [], "")])
        first, *others = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scope_metrics in enumerate(scopes):
            if scope_metrics.scope.name == "l4gw":
                scopes[i] = ScopeMetrics(
                    scope_metrics.scope,
                    [*scope_metrics.metrics, *extra],
                    scope_metrics.schema_url,
                )
                break
        else:
            scope = InstrumentationScope("l4gw", __version__, SCHEMA_URL)
            scopes.append(ScopeMetrics(scope, extra, SCHEMA_URL))
        return MetricsData([ResourceMetrics(first.resource, scopes, first.schema_url), *others])

    def prometheus_text(self) -> bytes:
        """The metrics in Prometheus text format. Blocking: call from a worker thread."""
        if self.registry is None:
            raise RuntimeError("no Prometheus reader (the admin endpoint is not configured)")
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def shutdown(self, timeout: float = EXIT_FLUSH_TIMEOUT) -> None:
        """Flush and stop spans and metrics within about ``timeout`` seconds; idempotent.

        Blocking: call after the loop (atexit does), never on it. The span
        exporter process and the metric exporters flush side by side; one
        whose last export failed gives up at once; if the flush still runs
        out of time (the collector went away at the last moment), every
        exporter is cut short, so a stopping gateway never hangs on telemetry.
        """
        if self._stopped:
            return
        self._stopped = True
        for exporter in self._exporters:
            if exporter.failing:
                exporter.abort()
        flush = threading.Thread(target=self._stop_providers, name="l4gw-telemetry-flush")
        flush.daemon = True
        flush.start()
        spans_ok = self.spans.close(timeout) if self.spans is not None else True
        flush.join(timeout)
        if flush.is_alive() or not spans_ok:
            for exporter in self._exporters:
                exporter.abort()
            flush.join(1.0)
            log.warning(
                "telemetry: final flush gave up after %gs (collector unreachable?)", timeout
            )

    def _stop_providers(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


_current: Telemetry | None = None


def current() -> Telemetry | None:
    """The process's telemetry, once the plugin set it up (None when off)."""
    return _current


def setup(
    config: TelemetryConfig,
    *,
    prometheus: bool,
    env: Mapping[str, str] | None = None,
    install: bool = True,
    run_as: tuple[int, int] | None = None,
) -> Telemetry | None:
    """Build the providers ``config`` and the environment ask for.

    Args:
        config: the ``[telemetry]`` section.
        prometheus: also collect metrics for ``/metrics`` (the admin endpoint is on).
        env: the environment (``os.environ`` by default).
        install: make this the process's telemetry (:func:`current`) and the
            OpenTelemetry global providers (so other plugins' own spans and
            instruments, like the health plugin's ``l4gw.endpoint.healthy``
            gauge, share the pipeline), fold the exporters' log lines into
            the drop warning, and flush at exit.
        run_as: (uid, gid) the span exporter process runs as from its start
            (``[gateway] user``: it needs no privilege at all).

    Returns:
        None when nothing is exported and nothing is served: no SDK is loaded.

    Raises:
        ValueError: an unsupported OTLP protocol.
    """
    global _current
    env = os.environ if env is None else env
    traces = signal_exporter("traces", config.exporter, env)
    metrics = signal_exporter("metrics", config.exporter, env)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        if traces != "none" or metrics != "none":
            log.info("telemetry: OTEL_SDK_DISABLED=true: no spans, no exported metrics")
        traces = metrics = "none"
    if metrics == "console" and not env.get("OTEL_METRICS_EXPORTER"):
        # A JSON dump of every instrument each interval drowns the demo's spans;
        # metrics on the console only when asked for by name.
        metrics = "none"
    if traces == "none" and metrics == "none" and not prometheus:
        return None

    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, Any] = {"service.version": __version__}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = config.service_name
    resource = Resource.create(attributes)
    stats = ExportStats()
    if install:
        fold_exporter_logs(stats)
    telemetry = Telemetry(config, traces, metrics, None, None, stats, resource=resource)

    if traces != "none":
        _setup_traces(telemetry, resource, env, run_as)
    if metrics != "none" or prometheus:
        _setup_metrics(telemetry, resource, env, prometheus)

    if install:
        from opentelemetry import metrics as metrics_api
        from opentelemetry import trace as trace_api

        if telemetry.tracer_provider is not None:
            trace_api.set_tracer_provider(telemetry.tracer_provider)
        if telemetry.meter_provider is not None:
            metrics_api.set_meter_provider(telemetry.meter_provider)
        atexit.register(telemetry.shutdown)
        _current = telemetry
    pipe = telemetry.spans
    log.info(
        "telemetry: traces=%s%s metrics=%s%s sample_ratio=%s",
        traces if traces != "otlp" else f"otlp/{otlp_protocol('traces', env)}",
        ""
        if pipe is None
        else f" (exporter pid {pipe.pid})"
        if pipe.pid is not None
        else " (exporter thread)",
        metrics if metrics != "otlp" else f"otlp/{otlp_protocol('metrics', env)}",
        " +/metrics" if prometheus else "",
        env.get("OTEL_TRACES_SAMPLER") or config.sample_ratio,
    )
    return telemetry


def run_as(gateway: GatewayConfig) -> tuple[int, int] | None:
    """(uid, gid) of ``[gateway] user``/``group``, or None to stay as started."""
    if not gateway.user:
        return None
    identity = resolve_identity(gateway.user, gateway.group)
    return identity.uid, identity.gid


def exporter_settings(
    traces: str, resource: Any, env: Mapping[str, str], log_level: int = logging.WARNING
) -> dict[str, Any]:
    """What the span exporter process is told at start (plain values, see
    :mod:`gateway.telemetry.exporter`).

    Raises:
        ValueError: an unsupported OTLP protocol.
    """
    from gateway.telemetry.records import clean

    return {
        "exporter": traces,
        "protocol": otlp_protocol("traces", env) if traces == "otlp" else "",
        "resource": (clean(resource.attributes), resource.schema_url or ""),
        "queue_size": queue_size(env),
        "batch_size": batch_size(env),
        "delay": schedule_delay(env),
        "exit_timeout": max(0.5, EXIT_FLUSH_TIMEOUT - 1.0),
        "log_level": log_level,
        "nice": EXPORTER_NICE,
    }


def _setup_traces(
    telemetry: Telemetry, resource: Any, env: Mapping[str, str], run_as: tuple[int, int] | None
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased

    from gateway.telemetry.pipe import ENV_MODE, ExporterPipe
    from gateway.telemetry.records import record_span_processor

    sampler: Sampler | None = None
    if not env.get("OTEL_TRACES_SAMPLER"):
        sampler = ParentBased(TraceIdRatioBased(telemetry.config.sample_ratio))
        telemetry.sample_ratio = telemetry.config.sample_ratio
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER(_ARG) itself.
    provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
    settings = exporter_settings(
        telemetry.traces, resource, env, logging.getLogger().getEffectiveLevel()
    )
    settings["run_as"] = run_as
    mode = "thread" if env.get(ENV_MODE, "").strip().lower() == "thread" else "process"
    pipe = ExporterPipe(settings, telemetry.stats, mode)
    pipe.start()
    # Other plugins' own spans (through the global provider) take the same way out.
    provider.add_span_processor(record_span_processor(pipe.add))
    telemetry.spans = pipe
    telemetry.tracer_provider = provider
    telemetry.tracer = provider.get_tracer("l4gw", __version__, schema_url=SCHEMA_URL)


def _setup_metrics(
    telemetry: Telemetry, resource: Any, env: Mapping[str, str], prometheus: bool
) -> None:
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    from gateway import peers
    from gateway.telemetry.metrics import CountingMetricExporter, InjectingPrometheusReader

    readers: list[MetricReader] = []
    link = telemetry.link = peers.current()
    if link is not None and link.index > 0:
        # Worker 0 serves /metrics and exports for every worker; this one answers it.
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        telemetry.snapshot = InMemoryMetricReader()
        readers.append(telemetry.snapshot)
        prometheus = False
    elif telemetry.metrics != "none":
        counting = CountingMetricExporter(
            _metric_exporter(telemetry.metrics, env), telemetry.stats, telemetry.inject
        )
        readers.append(
            PeriodicExportingMetricReader(
                counting, export_interval_millis=metric_interval_ms(telemetry.config, env)
            )
        )
        telemetry._exporters.append(counting)
    if prometheus:
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry()
        if link is None:
            ProcessCollector(registry=registry)
        readers.append(InjectingPrometheusReader(telemetry.inject, registry=registry))
        if link is not None:  # after the reader, whose collection asks every worker
            from gateway.telemetry.metrics import WorkersProcessCollector

            registry.register(WorkersProcessCollector(lambda: telemetry.processes))
        telemetry.registry = registry
    provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
    telemetry.meter_provider = provider
    meter = provider.get_meter("l4gw", __version__, schema_url=SCHEMA_URL)
    telemetry.meter = meter
    stats = telemetry.stats

    def dropped(options: CallbackOptions) -> Sequence[Observation]:
        return [Observation(stats.spans_dropped)]

    def exported(options: CallbackOptions) -> Sequence[Observation]:
        return [Observation(stats.spans_exported)]

    def failed(options: CallbackOptions) -> Sequence[Observation]:
        return [Observation(stats.metric_exports_failed)]

    meter.create_observable_counter(
        "l4gw.telemetry.spans.dropped",
        [dropped],
        unit="{span}",
        description="Spans lost: export queue full or a batch the collector did not take",
    )
    meter.create_observable_counter(
        "l4gw.telemetry.spans.exported", [exported], unit="{span}", description="Spans delivered"
    )
    meter.create_observable_counter(
        "l4gw.telemetry.metric_exports.failed",
        [failed],
        unit="{export}",
        description="Periodic metric exports that failed",
    )
    _tproxy_guard_metrics(meter)
    from gateway.shield import metrics as shield_metrics

    shield_metrics.register(meter)


def _tproxy_guard_metrics(meter: Meter) -> None:
    """``l4gw.tproxy.restored`` and ``l4gw.tproxy.intact``, over the stats of the TPROXY
    guard running in this process (gateway/tproxy/guard.py); no points where none runs."""
    from opentelemetry.metrics import CallbackOptions, Observation

    from gateway.tproxy import guard as tproxy_guard

    def restored(options: CallbackOptions) -> Sequence[Observation]:
        guard = tproxy_guard.current()
        return [] if guard is None else [Observation(guard.stats.restored)]

    def intact(options: CallbackOptions) -> Sequence[Observation]:
        guard = tproxy_guard.current()
        if guard is None or guard.stats.stood_down:
            return []
        return [Observation(1 if guard.stats.intact else 0)]

    meter.create_observable_counter(
        "l4gw.tproxy.restored",
        [restored],
        unit="{restoration}",
        description="Times the TPROXY rules this gateway set up were found removed or changed "
        "and restored",
    )
    meter.create_observable_gauge(
        "l4gw.tproxy.intact",
        [intact],
        unit="1",
        description="1 when the last check found the TPROXY rules as set up (or restored "
        "them), 0 when it could not",
    )


def _metric_exporter(kind: str, env: Mapping[str, str]) -> MetricExporter:
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if otlp_protocol("metrics", env) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()
