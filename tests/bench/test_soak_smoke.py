"""bench/soak.py still runs: 20 s of every load, a reload, a worker kill, a verdict.

Not a performance or leak test (20 s say nothing about a trend): it keeps the soak
script from rotting as the gateway changes, and checks what a 20 s run can show
for sure: the series and the summary are there, the injected events happened
(reloads seen by every worker, a killed worker restarted), bulk flows were moved
by a kernel tier while short ones stayed in copy, and no load saw an error that a
worker kill does not explain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick


@pytest.mark.timeout(150)
def test_quick_soak_has_series_summary_and_no_unexpected_error(tmp_path: Path) -> None:
    stdout, report = run_quick("soak.py", [], ("wrk", "nginx"), tmp_path, 140)
    assert "verdict: " in stdout and "errors: 0 unexpected" in stdout, stdout

    series = report["series"]
    assert len(series) >= 10, series
    for role in ("supervisor", "worker0", "worker1"):
        sampled = [row for row in series if row.get(f"{role}_rss_kib")]
        assert len(sampled) >= 10, role
        assert all(row[f"{role}_fds"] > 0 for row in sampled), role
    assert any(row.get("admin_connections", 0) > 0 for row in series)

    summary = report["summary"]
    assert summary["errors_unexpected"] == 0, summary
    for name, load in summary["loads"].items():
        assert load["done"] > 0, name
        assert load["errors_unexpected"] == 0, (name, load)
    assert summary["config_divergences"] == [], summary["config_divergences"]
    assert summary["gateway_exit"] == 0

    # The injected events: reloads that every worker applied, a restarted worker.
    assert summary["reloads"]["sent"] >= 2
    assert summary["reloads"]["confirmed_by_every_worker"] >= 1, summary["reloads"]
    assert len(summary["kills"]) >= 1
    assert all(kill["restart_s"] is not None for kill in summary["kills"]), summary["kills"]

    # Bulk flows went to a kernel tier (the /metrics counter), short ones stayed in copy.
    assert sum(summary["spliced_worker0_metric"].values()) > 0, summary
    # Every flow starts in copy; fewer moved on than started there.
    tiers = summary["flows_per_tier_all_workers"]
    assert tiers["copy"] > tiers.get("splice", 0) + tiers.get("sockmap", 0), tiers

    # Both idle points were reached and every slot has its fds at both.
    assert set(summary["fds_at_idle"]) == {"supervisor", "worker0", "worker1"}
    assert isinstance(summary["verdict"]["flat"], bool)
