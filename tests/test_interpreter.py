"""The project's venv runs the interpreter the container ships (scripts/install.sh).

The gateway's cost per connection is mostly the interpreter's (docs/operations.md,
"Which Python"): tests and benchmarks measure what the product runs, Debian's python3,
not whichever python3 a machine puts first on PATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_venv_runs_the_distribution_python() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not the project's .venv ({sys.prefix}): install.sh did not make it")
    wanted = os.environ.get("L4GW_PYTHON", "/usr/bin/python3")
    assert os.path.realpath(sys._base_executable) == os.path.realpath(wanted), (
        f"{ROOT / '.venv'} runs {sys._base_executable}, not {wanted}: "
        "scripts/install.sh makes it again"
    )
