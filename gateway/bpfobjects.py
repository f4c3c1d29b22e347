"""Where the compiled BPF objects live, and why one is missing.

The kernel tiers (the sockmap accelerator, the shield) load objects that clang
compiles from bpf/*.bpf.c into ``gateway/bpf/``: ``make -C bpf`` in a source
checkout, the wheel's build step (setup.py) in an installed package. A tier that
cannot find its object says which of three cases it is in, because each has a
different remedy. Both tiers open their object through :func:`open_object`, so
both say why in the same words.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from gateway.relay import libbpf
from gateway.relay.libbpf import BpfError

__all__ = ["DIRECTORY", "ObjectUnavailable", "object_path", "open_object", "why_missing"]

DIRECTORY: Final = Path(__file__).resolve().parent / "bpf"
# Written by setup.py into a wheel built with L4GW_NO_BPF=1.
_NO_BPF_MARKER: Final = "NO_BPF"


class ObjectUnavailable(Exception):
    """The object is missing or libbpf cannot open it; ``str()`` is the one line why."""


def object_path(name: str) -> Path:
    """The shipped object ``name`` (e.g. ``"l4gw_sockmap.bpf.o"``)."""
    return DIRECTORY / name


def why_missing(path: Path) -> str:
    """One line for a tier whose object ``path`` is not there."""
    if path.parent == DIRECTORY:
        if (DIRECTORY / _NO_BPF_MARKER).is_file():
            return (
                f"BPF object {path.name} missing: this installation was built without its "
                "BPF objects (L4GW_NO_BPF=1); rebuild the wheel with clang to get the kernel tiers"
            )
        makefile = DIRECTORY.parent.parent / "bpf" / "Makefile"
        if makefile.is_file():
            return f"BPF object {path} missing (run make -C {makefile.parent})"
        return (
            f"BPF object {path.name} missing from the installed package "
            "(a wheel built without its BPF step); reinstall l4gw from a wheel built with clang"
        )
    return f"BPF object {path} missing"


def open_object(path: Path, *, check_missing: bool = True) -> libbpf.BpfObject:
    """Open the object at ``path``: parsed, nothing loaded into the kernel yet.

    libbpf's own lines (a verifier log can run to hundreds) go to debug level from
    here on: the caller's error is the one line that says why.

    Args:
        path: The object file.
        check_missing: Say :func:`why_missing` for a file that is not there, rather
            than libbpf's "cannot open".

    Raises:
        ObjectUnavailable: the file is missing or is not a BPF object libbpf can open.
    """
    if check_missing and not path.is_file():
        raise ObjectUnavailable(why_missing(path))
    libbpf.install_logging(ceiling=logging.DEBUG)
    try:
        return libbpf.BpfObject(str(path))
    except BpfError as exc:
        raise ObjectUnavailable(f"cannot open {path}: {exc.strerror}") from exc
