"""gateway.telemetry.stats: what export lost, counted, with one rate-limited warning."""

from __future__ import annotations

import logging
import subprocess
import sys

from gateway.telemetry.stats import ExportStats


def test_drops_are_counted_and_the_warning_rate_limited(caplog):
    stats = ExportStats(warn_interval=3600)
    stats.last_error = "connection refused"
    with caplog.at_level(logging.WARNING, logger="l4gw.telemetry"):
        stats.spans_lost(512, "export failed")
        stats.spans_lost(1, "export queue full")
        stats.spans_lost(1, "export queue full")
        stats.metrics_lost()
    assert stats.spans_dropped == 514
    assert stats.metric_exports_failed == 1
    warnings = [r for r in caplog.records if r.name == "l4gw.telemetry"]
    assert len(warnings) == 1
    assert "512 spans dropped" in warnings[0].getMessage()
    assert "connection refused" in warnings[0].getMessage()


def test_drop_warning_again_after_the_interval(caplog):
    stats = ExportStats(warn_interval=0)
    with caplog.at_level(logging.WARNING, logger="l4gw.telemetry"):
        stats.spans_lost(3, "export failed")
        stats.spans_lost(4, "export failed")
    messages = [r.getMessage() for r in caplog.records if r.name == "l4gw.telemetry"]
    assert len(messages) == 2
    assert "4 spans dropped since the last warning" in messages[1]
    assert "7 spans dropped" in messages[1]


def test_the_pipe_and_the_metric_wrappers_need_nothing_of_the_providers() -> None:
    """stats is below providers, metrics and pipe: no cycle among those three."""
    code = (
        "import sys\n"
        "import gateway.telemetry.pipe, gateway.telemetry.metrics\n"
        "assert 'gateway.telemetry.providers' not in sys.modules, 'providers imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
