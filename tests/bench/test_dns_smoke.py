"""bench/names.py still runs: one tiny round, a table, both paths served, DNS off the connection path.

Not a performance test (nothing here looks at how fast anything is): it keeps the
benchmark script from rotting as the gateway changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick


@pytest.mark.timeout(90)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    stdout, report = run_quick("names.py", [], ("wrk", "nginx", "dnsmasq"), tmp_path, 80)
    assert "| dns |" in stdout and "| literal |" in stdout
    for path in ("literal", "dns"):
        assert report["median"][path]["rps"] > 0, path
    assert report["dns_over_literal_rps"] > 0
    # The gateway re-resolved while the load ran (TTL 1 s), but not per connection.
    requests = report["samples"]["dns"][0]["requests"]
    assert 0 < report["dns_queries_per_second"] * report["settings"]["seconds"] < requests
