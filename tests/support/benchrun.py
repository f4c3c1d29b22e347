"""Running a bench/ script once, quickly, for the smoke tests that keep it from rotting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(
    script: str, args: list[str], tools: tuple[str, ...], tmp_path: Path, timeout: float
) -> tuple[str, dict[str, Any]]:
    """Run ``bench/<script> --quick <args> --json FILE``; return its stdout and report.

    Skips when a tool the bench needs is missing, except under CI (there the
    install script must have provided it, so a missing tool fails the run).
    """
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"bench tools not installed: {missing} (scripts/install.sh)")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(out.read_text())
