"""gateway/bpfobjects.py: opening a BPF object says why it cannot, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import bpfobjects
from gateway.bpfobjects import ObjectUnavailable, open_object


def test_the_shipped_objects_open() -> None:
    for name in ("l4gw_sockmap.bpf.o", "l4gw_shield.bpf.o"):
        open_object(bpfobjects.object_path(name)).close()


def test_a_missing_object_says_it_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ObjectUnavailable, match=r"^BPF object .*absent\.bpf\.o missing$"):
        open_object(tmp_path / "absent.bpf.o")


def test_without_the_check_a_missing_object_is_libbpfs_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(ObjectUnavailable, match=r"^cannot open .*absent\.bpf\.o: "):
        open_object(tmp_path / "absent.bpf.o", check_missing=False)


def test_a_file_that_is_not_an_object_cannot_be_opened(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.bpf.o"
    bogus.write_bytes(b"\x7fELF not really")
    with pytest.raises(ObjectUnavailable, match=r"^cannot open .*bogus\.bpf\.o: "):
        open_object(bogus)
