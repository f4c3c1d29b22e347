"""gateway/linux.py is the one source of the Linux constants, and holds no dead ones."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINUX = ROOT / "gateway" / "linux.py"


def _constants() -> set[str]:
    tree = ast.parse(LINUX.read_text())
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return names


def _sources() -> list[Path]:
    return [
        path
        for folder in ("gateway", "plugins")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != LINUX
    ]


def test_the_module_defines_constants():
    assert {"IP_TRANSPARENT", "SO_COOKIE", "TCP_INFO", "SO_RCVLOWAT"} <= _constants()


def test_every_constant_is_used():
    used: set[str] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "gateway.linux":
                used.update(alias.name for alias in node.names)
    assert sorted(_constants() - used) == []


def test_no_other_module_defines_one_again():
    constants = _constants()
    again = []
    for path in _sources():
        for node in ast.parse(path.read_text()).body:
            targets = (
                node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            )
            for t in targets:
                if isinstance(t, ast.Name) and t.id.lstrip("_") in constants:
                    again.append(f"{path.relative_to(ROOT)}:{node.lineno} {t.id}")
    assert again == []
