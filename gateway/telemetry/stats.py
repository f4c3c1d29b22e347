"""What telemetry export lost: counts, and one rate-limited warning.

Shared by the three places that export or lose telemetry: the providers' set-up
(:mod:`gateway.telemetry.providers`), the metric exporter wrappers
(:mod:`gateway.telemetry.metrics`) and the span pipe to the exporter process
(:mod:`gateway.telemetry.pipe`). It imports none of them.

Rules kept here:

* **Lost data is counted, never logged one by one.** A warning says what was
  dropped at most once per :data:`WARN_INTERVAL`; ``/metrics`` reads the counts.
* **The exporters' own per-batch error lines are folded in**
  (:func:`fold_exporter_logs`): the last one is kept for that warning.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

__all__ = ["WARN_INTERVAL", "ExportStats", "fold_exporter_logs"]

log = logging.getLogger("l4gw.telemetry")

WARN_INTERVAL = 30.0
"""Seconds between two "telemetry is dropping data" warnings."""


@dataclass
class ExportStats:
    """Counts of exported and lost telemetry; read by ``/metrics`` and the log.

    Updated from the trio thread (queue overflow) and the exporter threads
    (failed batches), hence the lock; reads of single ints need none.
    """

    spans_exported: int = 0
    spans_dropped: int = 0
    """Spans lost: queue full (collector slow or down) or a batch that failed."""
    metric_exports_failed: int = 0
    last_error: str = ""
    """The last error an exporter reported (its own log line, folded in here)."""
    warn_interval: float = WARN_INTERVAL
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _last_warning: float = field(default=-1e9, repr=False)
    _unreported: int = field(default=0, repr=False)

    def spans_lost(self, count: int, why: str) -> None:
        with self._lock:
            self.spans_dropped += count
            self._unreported += count
            self._maybe_warn(why)

    def metrics_lost(self) -> None:
        with self._lock:
            self.metric_exports_failed += 1
            self._maybe_warn("metric export failed")

    def _maybe_warn(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_warning < self.warn_interval:
            return
        self._last_warning = now
        log.warning(
            "telemetry: %d spans dropped since the last warning (%s; last exporter error: %s); "
            "%d spans dropped, %d metric exports failed since start; the gateway keeps serving",
            self._unreported,
            why,
            self.last_error or "-",
            self.spans_dropped,
            self.metric_exports_failed,
        )
        self._unreported = 0


class _ExporterLog(logging.Handler):
    """Folds the OTLP exporters' per-batch error lines into :class:`ExportStats`."""

    def __init__(self, stats: ExportStats) -> None:
        super().__init__(logging.WARNING)
        self.stats = stats

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stats.last_error = record.getMessage()[:300]
        except Exception:
            pass


def fold_exporter_logs(stats: ExportStats) -> None:
    """Route the exporters' own warnings into ``stats`` instead of one line per batch.

    Left alone at debug level, where every line may be wanted.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    exporter_log = logging.getLogger("opentelemetry.exporter")
    exporter_log.propagate = False
    exporter_log.addHandler(_ExporterLog(stats))
