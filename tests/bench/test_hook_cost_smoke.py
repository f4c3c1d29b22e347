"""bench/hook_cost.py still runs: the per-connection pipeline in process, tiny counts.

Not a performance test: no number is compared with a threshold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("disable", ["", "telemetry,ratelimit,acl"])
def test_pipeline_runs(disable: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hook_cost.py"), "--count", "200", "--repeat", "1",
         "--disable", disable],
        capture_output=True, text=True, timeout=50, check=True,
    ).stdout  # fmt: skip
    assert "µs per connection" in out and "routing" in out
    for name in filter(None, disable.split(",")):
        assert name not in out.split("plugins:")[1]
