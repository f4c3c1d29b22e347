"""Metric exporter and reader wrappers: the plugin's own metrics added, failures counted.

Imported only when metrics are on (it needs the OpenTelemetry SDK). Failed
exports land in :class:`gateway.telemetry.stats.ExportStats`, which rate-limits the
warning; nothing here logs per batch. Spans take another way out: the
exporter process (:mod:`gateway.telemetry.exporter`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from gateway.telemetry.stats import ExportStats

Inject = Callable[[MetricsData | None], MetricsData | None]


class CountingMetricExporter(MetricExporter):
    """Adds the plugin's own metrics (``inject``), counts failed exports; never raises."""

    def __init__(self, inner: MetricExporter, stats: ExportStats, inject: Inject) -> None:
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self.inner = inner
        self.stats = stats
        self.inject = inject
        self.failing = False
        self.aborted = False

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            data = self.inject(metrics_data) or metrics_data
            result = self.inner.export(data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:
            self.stats.last_error = repr(exc)[:300]
            result = MetricExportResult.FAILURE
        self.failing = result is not MetricExportResult.SUCCESS
        if self.failing:
            self.stats.metrics_lost()
        return result

    def abort(self) -> None:
        """Stop ``inner`` now: a retry in progress gives up, later exports fail at once."""
        if not self.aborted:
            self.aborted = True
            self.inner.shutdown()

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if not self.aborted:
            self.aborted = True
            self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class InjectingPrometheusReader(PrometheusMetricReader):
    """The Prometheus reader, with the plugin's own metrics added at each scrape (and in
    worker 0 of several, every worker's: :meth:`Telemetry.inject
    <gateway.telemetry.providers.Telemetry.inject>`)."""

    def __init__(self, inject: Inject, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inject = inject
        # The exporter labels a scope without a version or schema (a plugin's meter)
        # otel_scope_version="": an empty label is an absent one, so it is left out.
        collector = getattr(self, "_collector", None)
        build = getattr(collector, "_build_scope_attrs", None)
        if collector is not None and build is not None:

            def scope_attrs(scope: Any) -> dict[str, Any]:
                return {k: v for k, v in build(scope).items() if v != ""}

            collector._build_scope_attrs = scope_attrs

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        data = self.inject(metrics_data)
        if data is not None:
            super()._receive_metrics(data, timeout_millis=timeout_millis, **kwargs)


class WorkersProcessCollector:
    """``process_*`` of every worker (``[gateway] workers > 1``), each with an
    ``l4gw_worker`` label, from the reports of the collection that just ran.

    Registered after the Prometheus reader, whose collection asks the workers for
    their reports (:meth:`Telemetry.inject <gateway.telemetry.providers.Telemetry.inject>`
    fills ``reports``): the registry collects in registration order.
    ``process_cpu_seconds_total`` carries over a worker's restarts as every counter
    does; the gauges describe the process running now.
    """

    def __init__(self, reports: Callable[[], dict[int, dict[str, Any]]]) -> None:
        self.reports = reports

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[str, Any] = {}
        for index, process in sorted(self.reports().items()):
            for name, value in process.items():
                family = families.get(name)
                if family is None:
                    meta = PROCESS_METRICS.get(name)
                    if meta is None:
                        continue
                    kind, family_name, help_text = meta
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    family = families[name] = cls(family_name, help_text, labels=["l4gw_worker"])
                family.add_metric([str(index)], value)
        return list(families.values())


PROCESS_METRICS = {
    "process_cpu_seconds_total": (
        "counter",
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds.",
    ),
    "process_open_fds": ("gauge", "process_open_fds", "Number of open file descriptors."),
    "process_max_fds": ("gauge", "process_max_fds", "Maximum number of open file descriptors."),
    "process_resident_memory_bytes": (
        "gauge",
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
    ),
    "process_virtual_memory_bytes": (
        "gauge",
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
    ),
    "process_start_time_seconds": (
        "gauge",
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
    ),
}
"""The samples of prometheus_client's ProcessCollector: (kind, family, help)."""


def process_samples() -> dict[str, float]:
    """This process's ``process_*`` samples (prometheus_client's ProcessCollector)."""
    from prometheus_client import ProcessCollector

    return {
        sample.name: sample.value
        for family in ProcessCollector(registry=None).collect()
        for sample in family.samples
        if sample.name in PROCESS_METRICS
    }
