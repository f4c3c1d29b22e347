"""Coverage-guided fuzzing with atheris: one bounded libFuzzer run per target.

Each harness (``fuzz_<target>.py``) runs as its own process, starting from its seed
corpus (``corpus/<target>/``) and the inputs that once crashed it
(``regressions/<target>/``); what it finds new goes to a temporary directory, never
into the repository. Any exception the code under test raises for an input, or an
input that takes longer than ``-timeout``, fails the test with the input saved.

To turn a crash into a regression: fix the code, copy the crash file to
``regressions/<target>/<what it was>``; ``test_regressions.py`` replays it from then
on. For a longer campaign: ``L4GW_FUZZ_SECONDS=600 pytest tests/fuzz/test_fuzzing.py``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SECONDS = int(os.environ.get("L4GW_FUZZ_SECONDS", "20"))
# Per target: the longest input worth trying (a v2 header is at most 2064 bytes; a
# ClientHello the listener peeks at, 16 KiB by default; a config file, a few KiB, and
# an integer too long for int() needs more than 4300 digits) and a dictionary.
TARGETS = {
    "proxy_protocol": ["-max_len=2200", f"-dict={HERE / 'proxy_protocol.dict'}"],
    "clienthello": ["-max_len=4096"],
    "config": ["-max_len=8192", "-len_control=0", f"-dict={HERE / 'config.dict'}"],
}

pytestmark = [
    pytest.mark.timeout(SECONDS + 120),
    pytest.mark.skipif(
        platform.machine() != "x86_64", reason="atheris publishes wheels for x86_64 only"
    ),
]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bounded_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    found, artifacts = tmp_path / "found", tmp_path / "artifacts"
    found.mkdir()
    artifacts.mkdir()
    seeds = [HERE / kind / target for kind in ("corpus", "regressions")]
    command = [
        sys.executable,
        str(HERE / f"fuzz_{target}.py"),
        f"-max_total_time={SECONDS}",
        "-timeout=10",  # seconds for one input: anything slower is a bug of its own
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        *TARGETS[target],
        str(found),
        *(str(d) for d in seeds if d.is_dir()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 90, cwd=ROOT)
    output = result.stdout + result.stderr
    crashes = sorted(artifacts.iterdir())
    assert not crashes and result.returncode == 0, (
        f"fuzz_{target} failed (exit {result.returncode}); inputs: "
        + ", ".join(f"{p} ({p.read_bytes()[:64]!r})" for p in crashes)
        + f"\n{output[-6000:]}"
    )
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert runs and int(runs[1]) > 100, output[-3000:]
