"""bench/script.py: what every bench script's main() shares."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest

# Loaded from its file: bench/ on sys.path would shadow the standard library's
# ``profile`` with bench/profile.py for every later test.
_spec = importlib.util.spec_from_file_location(
    "l4gw_bench_script", Path(__file__).resolve().parents[2] / "bench" / "script.py"
)
assert _spec is not None and _spec.loader is not None
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
missing_tools, interrupt_on_sigterm, write_report = (
    script.missing_tools,
    script.interrupt_on_sigterm,
    script.write_report,
)


def test_a_missing_tool_is_named_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert not missing_tools(["sh"])
    assert missing_tools(["sh", "l4gw-no-such-tool"], "soak")
    assert capsys.readouterr().err == (
        "soak: missing tools ['l4gw-no-such-tool']: run scripts/install.sh\n"
    )


def test_sigterm_unwinds_like_ctrl_c() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        interrupt_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_report_is_written_only_when_asked(tmp_path: Path) -> None:
    write_report(None, {"a": 1})
    out = tmp_path / "r.json"
    write_report(str(out), {"a": [1, 2]})
    assert out.read_text().endswith("}\n")
    assert json.loads(out.read_text()) == {"a": [1, 2]}
