"""What the fuzz harnesses share: instrumentation when run as a fuzzer, and the entry point.

A harness (``fuzz_<target>.py``) is both a program and a module. Run as a program
(``python tests/fuzz/fuzz_<target>.py [libFuzzer flags] [corpus dirs]``) it imports the
code under test inside :func:`instrumented`, so atheris adds coverage feedback to it,
and hands its ``check`` to libFuzzer. Imported as a module (tests/fuzz/test_regressions.py)
it is plain Python: ``check(data)`` raises for any input the code under test gets wrong,
and nothing is instrumented.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Sequence
from typing import Any


def instrumented(module_name: str, include: Sequence[str]) -> Any:
    """A context to import the code under test in: atheris instruments what is
    imported in it when the harness runs as the fuzzer (``module_name == "__main__"``)."""
    if module_name != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=list(include))


def main(check: Callable[[bytes], None]) -> None:
    """Fuzz ``check`` with libFuzzer's command line (``sys.argv``); any exception it
    raises is a crash, saved as ``<artifact_prefix>crash-<sha1>``. One mutation in
    eight is :func:`repeat_piece`, the rest are libFuzzer's own."""
    import atheris

    atheris.Setup(sys.argv, check, custom_mutator=_mutate)
    atheris.Fuzz()


def repeat_piece(data: bytes, max_size: int, seed: int) -> bytes:
    """``data`` with one short piece of it repeated up to a few thousand times in place.

    Nesting depth and the length of a number are limits a parser must survive, but
    going deeper or longer reaches no new code, so coverage never leads libFuzzer's
    own mutations there: "[" repeated 1,000 times or 5,000 digits need this one.
    """
    rng = random.Random(seed)
    if not data:
        return data
    start = rng.randrange(len(data))
    piece = data[start : start + rng.randint(1, 4)]
    room = max(0, max_size - len(data)) // len(piece)
    times = min(room, rng.choice((16, 300, 1200, 5000)))
    return (data[:start] + piece * times + data[start:])[:max_size]


def _mutate(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    if seed % 8 == 0:
        return repeat_piece(data, max_size, seed)
    return bytes(atheris.Mutate(data, max_size))
