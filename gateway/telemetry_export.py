"""Exporter and processor wrappers that count what telemetry export loses.

Imported only when telemetry is on (it needs the OpenTelemetry SDK). The
counts land in :class:`gateway.telemetry.ExportStats`, which rate-limits the
warning; nothing here logs per span or per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .otlp_encode import SpanEncoder
from .telemetry import ExportStats


def fast_span_exporter(protocol: str) -> SpanExporter:
    """The SDK's OTLP span exporter for ``protocol``, encoding with :class:`SpanEncoder`.

    Everything but the encoding is the SDK's: endpoint, headers, TLS,
    compression, timeout and retries from the standard variables.
    """
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        class FastGrpcSpanExporter(GrpcSpanExporter):
            def __init__(self) -> None:
                super().__init__()
                self._encoder = SpanEncoder()

            def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
                request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
                    self._encoder.encode(data)
                )
                return request

        return FastGrpcSpanExporter()

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class FastHttpSpanExporter(OTLPSpanExporter):
        def __init__(self) -> None:
            super().__init__()
            self._encoder = SpanEncoder()

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            client = getattr(self, "_client", None)
            if client is None or getattr(self, "_shutdown", True):
                # Not the exporter this was written against (or shut down): its own path.
                return super().export(spans)
            result = client.export(self._encoder.encode(spans))
            return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE

    return FastHttpSpanExporter()


class CountingSpanExporter(SpanExporter):
    """Counts what ``inner`` delivered and lost; never raises."""

    def __init__(self, inner: SpanExporter, stats: ExportStats) -> None:
        self.inner = inner
        self.stats = stats
        self.received = 0
        """Spans taken off the batch queue so far (the queue's occupancy derives from it)."""
        self.failing = False
        """The last export failed."""
        self.aborted = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self.received += count
        try:
            result = self.inner.export(spans)
        except Exception as exc:
            self.stats.last_error = repr(exc)[:300]
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.failing = False
            self.stats.spans_exported += count
        else:
            self.failing = True
            self.stats.spans_lost(count, "export failed")
        return result

    def abort(self) -> None:
        """Stop ``inner`` now: a retry in progress gives up, later exports fail at once."""
        if not self.aborted:
            self.aborted = True
            self.inner.shutdown()

    def shutdown(self) -> None:
        self.abort()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


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


class BoundedSpanProcessor(SpanProcessor):
    """A batch processor whose overflow is counted instead of logged per span.

    The batch queue holds at most ``limit`` spans. Spans handed on minus spans
    the exporter took is the queue's occupancy, so a span that would overflow
    it is dropped and counted here, on the trio thread, for the price of a
    subtraction (the SDK's own overflow path logs a line for each span).
    """

    def __init__(
        self, batch: SpanProcessor, exporter: CountingSpanExporter, limit: int, stats: ExportStats
    ) -> None:
        self.batch = batch
        self.exporter = exporter
        self.limit = limit
        self.stats = stats
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        if self.ended - self.exporter.received >= self.limit:
            self.stats.spans_lost(1, "export queue full")
            return
        self.ended += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


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
