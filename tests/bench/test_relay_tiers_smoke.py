"""bench/relay_tiers.py still runs: a tiny bulk and ping-pong load on each tier.

Not a performance test (nothing here looks at how fast anything is): it keeps
the benchmark script from rotting as the relay tiers change, and checks that
each gateway path really ran in the tier it names (the status counts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick

TOOLS = ("iperf3", "haproxy")


@pytest.mark.privileged
@pytest.mark.timeout(90)
def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    stdout, report = run_quick(
        "relay_tiers.py",
        ["--only", "iperf-1,pingpong", "--paths", "direct,splice,sockmap,haproxy-splice"],
        TOOLS,
        tmp_path,
        80,
    )
    lines = stdout.splitlines()
    assert any(line.startswith("| load") and "÷direct" in line for line in lines), stdout
    assert any(line.startswith("iperf-1: best tier") for line in lines), stdout

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


@pytest.mark.privileged
@pytest.mark.timeout(90)
def test_a_policy_path_runs_with_its_relay_lines(tmp_path: Path) -> None:
    """``--policy LABEL=TOML`` adds path policy-LABEL, a gateway with those lines: here
    promotion at once to splice, so its flows are counted in splice."""
    _, report = run_quick(
        "relay_tiers.py",
        ["--only", "pingpong", "--paths", "direct", "--policy",
         'now=tiers = ["splice", "copy"]\\npromote_after_bytes = 0'],
        TOOLS,
        tmp_path,
        80,
    )  # fmt: skip
    assert set(report["results"]["pingpong"]["paths"]) == {"direct", "policy-now"}
    counts = report["relay_status"]["policy-now"]["tiers"]
    assert counts["splice"]["flows_total"] > 0, counts
