"""bench/telemetry_overhead.py still runs: one tiny round, a table, spans received.

Not a performance test (nothing here looks at how fast anything is): it keeps
the benchmark script from rotting as the gateway changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick


@pytest.mark.timeout(90)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    stdout, report = run_quick("telemetry_overhead.py", [], ("wrk", "nginx"), tmp_path, 80)
    assert "| wrk-close | conn/s |" in stdout
    assert report["traced_connections"] > 0
    # Every traced connection reached the OTLP sink as spans.
    assert report["spans_received"] > 0
    for load in ("wrk-close", "wrk-keepalive"):
        for path in ("disabled", "off", "traced"):
            assert report["results"][load]["median"][path]["rps"] > 0


@pytest.mark.timeout(90)
def test_pinned_run_reports_the_interval(tmp_path: Path) -> None:
    args = ["--pin", "--paths", "off,traced", "--loads", "wrk-close"]
    stdout, report = run_quick("telemetry_overhead.py", args, ("wrk", "nginx"), tmp_path, 80)
    assert report["settings"]["pin"] is True
    low, high = report["results"]["wrk-close"]["traced_over_off_per_round_ci"]
    assert 0 < low <= high
    assert "95 % CI" in stdout
