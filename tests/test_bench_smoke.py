"""bench/run.py still runs: one tiny load on every path, a table and JSON out.

Not a performance test (nothing here looks at how fast anything is): it
keeps the benchmark script from rotting as the gateway changes.
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
TOOLS = ("wrk", "nginx", "haproxy", "iperf3")


@pytest.mark.timeout(60)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {missing} (scripts/install.sh)")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--quick",
            "--only",
            "wrk-keepalive",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("| load") and "gw÷direct" in line for line in lines), done.stdout
    assert any(line.startswith("| wrk-keepalive | req/s") for line in lines), done.stdout

    report = json.loads(out.read_text())
    paths = report["results"]["wrk-keepalive"]["paths"]
    assert {"direct", "gateway", "gateway-copy", "haproxy"} <= set(paths)
    for name, result in paths.items():
        median = result["median"]
        assert median["requests"] > 0, name
        assert median["non_2xx"] == 0, name
    assert paths["gateway"]["median"]["proxy_cpu_pct"] > 0
