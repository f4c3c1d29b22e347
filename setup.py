"""Compiles the BPF programs into the wheel.

Everything else about the package is in pyproject.toml; this file only adds a
build step that setuptools' declarative configuration cannot express: the
kernel tiers (the sockmap accelerator, the shield) ship as BPF objects that
clang compiles from bpf/*.bpf.c, and ``pip install l4gw`` must give the same
gateway as the source checkout, objects included.

* A wheel (``pip install .``, ``pip wheel .``, ``python -m build``) runs
  ``make -C bpf OUT=<the wheel's gateway/bpf>``. Without clang, make or the
  libbpf headers the build stops with one line saying what to install.
* ``L4GW_NO_BPF=1`` builds a pure-Python wheel on purpose. It carries a
  ``gateway/bpf/NO_BPF`` marker, and the gateway names it at run time when a
  kernel tier is asked for ("this installation was built without its BPF
  objects"), so the missing tier is never a mystery.
* An editable install (``pip install -e .``, what scripts/install.sh does)
  compiles no BPF: the objects are built in place by ``make -C bpf``.

It also builds the one C extension, ``gateway.relay._copystep`` (the copy tier's
inner loop; gateway/relay/copy.py), in place for an editable install. The
gateway runs without it (the same loop in Python, named at start), so
``L4GW_NO_EXT=1`` leaves it out on purpose; otherwise a missing compiler or
Python headers stop the build with what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
NO_BPF_MARKER = "NO_BPF"


class BuildPyWithBpf(build_py):
    """build_py, then the BPF objects into the build tree's gateway/bpf."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        out = Path(self.build_lib) / "gateway" / "bpf"
        out.mkdir(parents=True, exist_ok=True)
        if os.environ.get("L4GW_NO_BPF") == "1":
            (out / NO_BPF_MARKER).write_text(
                "built with L4GW_NO_BPF=1: no BPF objects, so no sockmap or shield tier\n"
            )
            return
        missing = [
            tool for tool in ("make", os.environ.get("CLANG", "clang")) if not shutil.which(tool)
        ]
        if missing:
            raise SystemExit(
                f"l4gw: building the wheel compiles bpf/*.bpf.c and needs {' and '.join(missing)} "
                "(Debian: apt install clang make libbpf-dev); "
                "set L4GW_NO_BPF=1 to build a wheel without the kernel tiers"
            )
        try:
            subprocess.run(
                ["make", "-s", "-C", str(HERE / "bpf"), f"OUT={out.resolve()}"], check=True
            )
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"l4gw: compiling the BPF objects failed (make exited {exc.returncode}); "
                "libbpf-dev and the kernel headers (linux-libc-dev) are needed; "
                "L4GW_NO_BPF=1 builds a wheel without the kernel tiers"
            ) from exc


class BuildExtSaid(build_ext):
    """build_ext, stopping with one line that says what to install when it fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            raise SystemExit(
                f"l4gw: compiling gateway/relay/_copystep.c failed ({exc}); it needs gcc and "
                "the Python headers (Debian: apt install gcc python3-dev); "
                "L4GW_NO_EXT=1 builds without it (the copy tier then runs its loop in Python)"
            ) from exc


extensions = (
    []
    if os.environ.get("L4GW_NO_EXT") == "1"
    else [Extension("gateway.relay._copystep", ["gateway/relay/_copystep.c"])]
)

setup(
    cmdclass={"build_py": BuildPyWithBpf, "build_ext": BuildExtSaid},
    ext_modules=extensions,
)
