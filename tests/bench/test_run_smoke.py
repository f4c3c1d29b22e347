"""bench/run.py still runs: one tiny load on every path, a table and JSON out.

Not a performance test (nothing here looks at how fast anything is): it
keeps the benchmark script from rotting as the gateway changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick

TOOLS = ("wrk", "nginx", "haproxy", "iperf3")


@pytest.mark.timeout(60)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    stdout, report = run_quick("run.py", ["--only", "wrk-keepalive"], TOOLS, tmp_path, 50)
    lines = stdout.splitlines()
    assert any(line.startswith("| load") and "gw÷direct" in line for line in lines), stdout
    assert any(line.startswith("| wrk-keepalive | req/s") for line in lines), stdout

    paths = report["results"]["wrk-keepalive"]["paths"]
    assert {"direct", "gateway", "gateway-copy", "haproxy"} <= set(paths)
    for name, result in paths.items():
        median = result["median"]
        assert median["requests"] > 0, name
        assert median["non_2xx"] == 0, name
    assert paths["gateway"]["median"]["proxy_cpu_pct"] > 0
    # The whole machine worked for every path, the client and nginx at least.
    assert all(result["median"]["machine_us_per_req"] > 0 for result in paths.values())
    assert all(result["median"]["kthreads_us_per_req"] >= 0 for result in paths.values())
