"""The package as a release builds it: sdist, then a wheel from that sdist, installed
into a fresh virtual environment (not editable), from a clean export of the checkout.

``pip install l4gw`` must give what the README promises: the wheel carries every
compiled BPF object (setup.py compiles bpf/*.bpf.c with clang), so the installed
gateway's sockmap tier loads and passes its self-test, and the copy tier's compiled
loop. A wheel built on purpose without them (``L4GW_NO_BPF=1``, ``L4GW_NO_EXT=1``)
says so at run time instead of pointing at a Makefile that is not there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
# Building runs pip in isolated environments and installs the runtime dependencies.
TIMEOUT = 600


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None, ok: int = 0) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == ok, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _export(dest: Path) -> Path:
    """The files a clean checkout has: tracked ones (and new ones not ignored, so the
    test also holds before a commit); nothing built in the tree comes along."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    src = dest / "src"
    for raw in filter(None, listed):
        rel = raw.decode()
        origin = ROOT / rel
        if not origin.is_file():  # deleted in the work tree, not yet committed
            continue
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(origin.read_bytes())
    return src


def _build(src: Path, out: Path, **env: str) -> Path:
    _run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        cwd=src,
        env={**os.environ, **env},
    )
    (wheel,) = out.glob("l4gw-*.whl")
    return wheel


def _venv_with(wheel: Path, where: Path) -> Path:
    venv = where / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=where)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=where)
    return venv


def _accel_status(venv: Path, cwd: Path, ok: int = 0) -> str:
    """``l4gw accel status`` (exit 1 when a tier it was asked for cannot load), run
    from a directory that holds no checkout, so nothing can come from the tree."""
    return _run([str(venv / "bin" / "l4gw"), "accel", "status"], cwd=cwd, ok=ok)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _export(tmp_path_factory.mktemp("export"))


def test_wheel_from_a_clean_export_carries_the_bpf_objects_and_the_tier_loads(
    export: Path, tmp_path: Path
) -> None:
    wheel = _build(export, tmp_path / "dist")
    sources = sorted(p.name.removesuffix(".c") + ".o" for p in (ROOT / "bpf").glob("*.bpf.c"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sources, "no BPF sources found"
    for obj in sources:
        assert f"gateway/bpf/{obj}" in names, f"{obj} not in {wheel.name}"
    (sdist,) = (tmp_path / "dist").glob("l4gw-*.tar.gz")
    assert sdist.stat().st_size > 0

    venv = _venv_with(wheel, tmp_path)
    location = _run(
        [str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        cwd=tmp_path,
    )
    assert str(venv) in location, f"gateway imported from {location}, not the installed wheel"
    status = _accel_status(venv, tmp_path)
    sockmap = next(line for line in status.splitlines() if line.strip().startswith("sockmap"))
    assert "usable" in sockmap, status
    # The copy tier's loop is compiled into the wheel too (setup.py, gateway/relay/copy.py).
    assert [n for n in names if n.startswith("gateway/relay/_copystep.") and n.endswith(".so")]
    assert "gateway/relay/_copystep.pyi" in names
    copy = next(line for line in status.splitlines() if line.strip().startswith("copy"))
    assert "compiled loop" in copy, status


def test_a_wheel_built_without_bpf_or_c_says_so_at_run_time(export: Path, tmp_path: Path) -> None:
    wheel = _build(export, tmp_path / "dist", L4GW_NO_BPF="1", L4GW_NO_EXT="1")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "gateway/bpf/NO_BPF" in names
    assert not [n for n in names if n.endswith((".bpf.o", ".so"))]

    status = _accel_status(_venv_with(wheel, tmp_path), tmp_path, ok=1)
    sockmap = next(line for line in status.splitlines() if line.strip().startswith("sockmap"))
    assert "built without its BPF objects" in sockmap, status
    assert "make -C" not in sockmap
    copy = next(line for line in status.splitlines() if line.strip().startswith("copy"))
    assert "loop in Python: gateway.relay._copystep is not built" in copy, status
