"""bench/relay_tiers.py still runs: a tiny bulk and ping-pong load on each tier.

Not a performance test (nothing here looks at how fast anything is): it keeps
the benchmark script from rotting as the relay tiers change, and checks that
each gateway path really ran in the tier it names (the status counts).
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
TOOLS = ("iperf3", "haproxy")


@pytest.mark.privileged
@pytest.mark.timeout(90)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {missing} (scripts/install.sh)")
    out = tmp_path / "tiers.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "relay_tiers.py"),
            "--quick",
            "--only",
            "iperf-1,pingpong",
            "--paths",
            "direct,splice,sockmap,haproxy-splice",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("| load") and "÷direct" in line for line in lines), done.stdout
    assert any(line.startswith("iperf-1: best tier") for line in lines), done.stdout

    report = json.loads(out.read_text())
    results = report["results"]
    for load, key in (("iperf-1", "gbit_s"), ("pingpong", "p50_us")):
        paths = results[load]["paths"]
        assert set(paths) == {"direct", "splice", "sockmap", "haproxy-splice"}, load
        for name, result in paths.items():
            assert result["median"][key] > 0, (load, name)
    # Each gateway moved its flows in the tier it is named for, not a fallback.
    for tier in ("splice", "sockmap"):
        counts = report["relay_status"][tier]["tiers"]
        assert counts[tier]["enabled"], counts[tier]
        assert counts[tier]["flows_total"] > 0 and counts["copy"]["flows_total"] == 0, counts
