"""bench/shield.py still runs: both modes, a flooder, a normal client, a report.

Not a performance test (1 s phases on a shared VM say nothing about rates): it keeps
the benchmark from rotting and checks what any run shows for sure: with the shield
the flooder is listed and the kernel drops its SYNs; with only the userspace limiter
nothing is dropped in the kernel.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(120)]


def test_quick_shield_bench_reports_both_modes(tmp_path: Path) -> None:
    stdout, report = run_quick("shield.py", [], (), tmp_path, 110)
    assert set(report["modes"]) == {"shield", "userspace"}, report
    shield, userspace = report["modes"]["shield"], report["modes"]["userspace"]
    for mode in (shield, userspace):
        assert mode["normal_unloaded"]["connections"] > 0, mode
        assert mode["flood"]["attempts"] > 0, mode
        assert mode["flooder_listed"], mode  # shield_after crossed in both modes
        assert mode["fraction"] >= 0, mode
    assert shield["kernel"]["enabled"] is True and shield["flooder_drops"] > 0, shield
    assert userspace["kernel"]["enabled"] is False and userspace["flooder_drops"] == 0
    assert "shield: normal client" in stdout and "userspace: normal client" in stdout
