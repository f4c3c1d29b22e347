"""bench/task_cost.py still runs: trio's task per connection under callgrind, tiny counts.

Not a performance test (no number is compared with a threshold): it keeps the script
from rotting. The counts are what callgrind says; only their sign is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchrun import run_quick


@pytest.mark.timeout(240)
def test_every_kind_is_counted(tmp_path: Path) -> None:
    _, report = run_quick("task_cost.py", [], ("valgrind",), tmp_path, 230)
    assert report["tasks"] == 160
    assert set(report["result"]) == {"park", "spawn", "kept"}
    # A task that parks and is woken does all a spawned one does, and more.
    assert report["result"]["park"] > report["result"]["spawn"] > 0
    assert report["result"]["kept"] > 0
