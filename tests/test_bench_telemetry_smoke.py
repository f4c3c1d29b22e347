"""bench/telemetry_overhead.py still runs: one tiny round, a table, spans received.

Not a performance test (nothing here looks at how fast anything is): it keeps
the benchmark script from rotting as the gateway changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {missing} (scripts/install.sh)")
    out = tmp_path / "telemetry.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "telemetry_overhead.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| wrk-close | conn/s |" in done.stdout
    report = json.loads(out.read_text())
    assert report["traced_connections"] > 0
    # Every traced connection reached the OTLP sink as spans.
    assert report["spans_received"] > 0
    for load in ("wrk-close", "wrk-keepalive"):
        for path in ("disabled", "off", "traced"):
            assert report["results"][load]["median"][path]["rps"] > 0
