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
    """The Prometheus reader, with the plugin's own metrics added at each scrape."""

    def __init__(self, inject: Inject, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inject = inject

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        data = self.inject(metrics_data)
        if data is not None:
            super()._receive_metrics(data, timeout_millis=timeout_millis, **kwargs)
