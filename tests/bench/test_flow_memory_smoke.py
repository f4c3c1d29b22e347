"""bench/flow_memory.py still runs: idle flows in each kernel tier, tiny counts.

Not a performance test (no number is compared with a threshold): it keeps the
tracemalloc harness from rotting, and checks that it measured flows in the tier asked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchrun import run_quick


@pytest.mark.timeout(60)
def test_idle_splice_flows_are_measured(tmp_path: Path) -> None:
    _, report = run_quick("flow_memory.py", ["--tier", "splice"], (), tmp_path, 50)
    assert report["flows"] == 20 and report["in_tier"] == {"splice": 20}
    assert report["bytes_per_flow"] > 0 and report["rows"]


@pytest.mark.timeout(60)
@pytest.mark.privileged
@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root for BPF")
def test_flows_over_the_sockmap_cap_are_measured_in_splice(tmp_path: Path) -> None:
    out, report = run_quick(
        "flow_memory.py", ["--relay", "sockmap_max_flows = 5"], (), tmp_path, 50
    )
    assert report["in_tier"] == {"sockmap": 5, "splice": 15}, out
