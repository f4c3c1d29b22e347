"""gateway.relay.probe: loading a kernel tier and running its canary; cleaning up after
a dead gateway."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.relay.policy import defaults
from gateway.relay.probe import limits_from, pid_alive, probe, remove_stale


def test_splice_probe_passes_unprivileged() -> None:
    result = probe("splice", defaults())
    assert result.tier == "splice" and result.error is None and result.accelerator is None


def test_a_missing_sockmap_object_is_one_line_and_no_accelerator(tmp_path: Path) -> None:
    missing = tmp_path / "none.bpf.o"
    result = probe("sockmap", {**defaults(), "sockmap_object": str(missing)})
    assert result.accelerator is None
    assert result.error is not None and str(missing) in result.error and "\n" not in result.error


def test_limits_from_the_section() -> None:
    limits = limits_from({"sockmap_high_watermark": 1 << 20})
    assert (limits.high_watermark, limits.hard_cap) == (1 << 20, 256 << 20)


@pytest.mark.timeout(30)
def test_remove_stale_removes_only_the_files_of_dead_processes(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True, timeout=20)  # fmt: skip
    dead = int(gone.stdout)
    assert not pid_alive(dead)
    mine = tmp_path / f"{os.getpid()}.json"
    theirs = tmp_path / f"{dead}.json"
    other = tmp_path / "notes.json"
    for path in (mine, theirs, other):
        path.write_text("{}")
    removed = remove_stale(tmp_path)
    assert str(theirs) in removed
    assert mine.exists() and other.exists() and not theirs.exists()


def test_accel_status_uses_the_core_alone(tmp_path: Path) -> None:
    """``l4gw accel status`` probes through gateway.relay: the core never imports a plugin
    (it used to load ``l4gw_plugins.relay`` for the policy and the probes)."""
    code = (
        "import argparse, sys\n"
        "from gateway.cli import accel\n"
        "accel.cmd_status(argparse.Namespace(config=None, json=True))\n"
        "loaded = [m for m in sys.modules if m.startswith('l4gw_plugins')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert '"policy"' in result.stdout and '"probe"' in result.stdout
