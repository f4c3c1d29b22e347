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
