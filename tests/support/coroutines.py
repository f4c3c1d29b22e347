"""What a suspended task awaits through: each coroutine or generator frame it holds."""

from __future__ import annotations

from typing import Any


def awaited_through(coro: Any) -> list[str]:
    """The names of ``coro`` and of the coroutines and generators it awaits, outermost
    first (each one a frame the task holds while it is suspended)."""
    names, it = [], coro
    while it is not None:
        code = getattr(it, "cr_code", None) or getattr(it, "gi_code", None)
        names.append(code.co_name if code is not None else type(it).__name__)
        it = getattr(it, "cr_await", None) or getattr(it, "gi_yieldfrom", None)
    return names
