"""A bound on per-connection warnings, so that a flood cannot fill the disk.

Every failed connection is recorded (close hook, access log, metrics); its
warning line in the gateway's own log is not always needed: a client opening
thousands of junk connections a second would otherwise write thousands of
lines a second. Per key (listener and close reason), at most :data:`LINES`
lines are written per :data:`WINDOW` seconds; the first line after a window in
which lines were held back says how many.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Final

LINES: Final = 20
WINDOW: Final = 10.0


class _Window:
    __slots__ = ("held", "start", "unreported", "written")

    def __init__(self, start: float) -> None:
        self.start = start
        self.written = 0
        self.held = 0
        """Lines held back in this window."""
        self.unreported = 0
        """Lines held back before, not yet reported by a written line."""


class LogBudget:
    """Per-key line budget (see the module docstring). Not thread-safe: one per trio loop."""

    __slots__ = ("_windows", "lines", "window")

    def __init__(self, lines: int = LINES, window: float = WINDOW) -> None:
        self.lines = lines
        self.window = window
        self._windows: dict[Hashable, _Window] = {}

    def allow(self, key: Hashable) -> int | None:
        """None when this line is to be held back; else how many lines like it
        were held back since the last one written (0 mostly)."""
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(now)
        elif now - w.start >= self.window:
            w.start, w.written, w.unreported, w.held = now, 0, w.unreported + w.held, 0
        if w.written >= self.lines:
            w.held += 1
            return None
        w.written += 1
        held, w.unreported = w.unreported, 0
        return held


def held_back(count: int) -> str:
    """The suffix of a line written after ``count`` like it were held back."""
    return f" ({count} more like it not logged)" if count else ""
