"""Every input that once crashed a fuzz target, and every seed, through its ``check``.

Plain Python, no atheris: the harnesses' ``check`` functions hold the contract of the
code under test (see each ``fuzz_<target>.py``), so an input that crashed it before a
fix must pass now, and the seeds must pass always.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import fuzz_clienthello
import fuzz_config
import fuzz_proxy_protocol
import pytest

HERE = Path(__file__).resolve().parent
CHECKS: dict[str, Callable[[bytes], None]] = {
    "proxy_protocol": fuzz_proxy_protocol.check,
    "clienthello": fuzz_clienthello.check,
    "config": fuzz_config.check,
}


def inputs(kind: str) -> Iterator[object]:
    for target in sorted(CHECKS):
        for path in sorted((HERE / kind / target).glob("*")):
            yield pytest.param(target, path, id=f"{target}/{path.name}")


@pytest.mark.parametrize(("target", "path"), list(inputs("regressions")))
def test_regression_input(target: str, path: Path) -> None:
    CHECKS[target](path.read_bytes())


@pytest.mark.parametrize(("target", "path"), list(inputs("corpus")))
def test_seed_input(target: str, path: Path) -> None:
    CHECKS[target](path.read_bytes())


def test_every_target_has_seeds() -> None:
    for target in CHECKS:
        assert len(list((HERE / "corpus" / target).glob("*"))) >= 4, target
