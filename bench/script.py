"""What the ``main()`` of every bench script shares: its tools, SIGTERM, its JSON report.

* A tool missing from PATH is exit status 2 with the fix: scripts/install.sh
  installs every tool a bench uses.
* SIGTERM unwinds like Ctrl-C, as KeyboardInterrupt, through the ``finally``
  that stops the children: a bench killed by a timeout leaves no process behind.
* ``--json FILE`` gets the report as indented JSON, one trailing newline.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any


def missing_tools(tools: Iterable[str], who: str = "bench") -> bool:
    """Say on stderr which of ``tools`` are not on PATH; True when any is missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"{who}: missing tools {missing}: run scripts/install.sh", file=sys.stderr)
    return bool(missing)


def interrupt_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


def write_report(path: str | None, doc: Any) -> None:
    """Write ``doc`` to ``path`` as JSON (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
