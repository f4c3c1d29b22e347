"""gateway.configwatch.ConfigWatch on real files: an atomic replace, a symlink swap,
a file written in place, a missing file, the watch turned off and on."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from gateway.configwatch import ConfigWatch
from gateway.testing import make_config


def config(path: Path, watch: bool = True):
    c = make_config("[gateway]\nwatch_config = true\n", path=str(path))
    return replace(c, gateway=replace(c.gateway, watch_config=watch))


def test_replaced_file_reloads_once_it_holds_still(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("a")
    c = config(path)
    w = ConfigWatch()
    assert not w.poll(c)  # the baseline
    assert not w.poll(c)
    new = tmp_path / "gw.toml.new"
    new.write_text("b")
    os.replace(new, path)
    assert not w.poll(c)  # changed: wait one poll
    assert w.poll(c)
    assert not w.poll(c)  # once per change


def test_symlink_swap_like_a_configmap(tmp_path):
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "gw.toml").write_text(version)
    (tmp_path / "..data").symlink_to("v1")
    path = tmp_path / "gw.toml"
    path.symlink_to(tmp_path / "..data" / "gw.toml")
    c = config(path)
    w = ConfigWatch()
    w.poll(c)
    (tmp_path / "..tmp").symlink_to("v2")
    os.replace(tmp_path / "..tmp", tmp_path / "..data")
    assert [w.poll(c), w.poll(c)] == [False, True]


def test_written_in_place_waits_for_the_last_write(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("a")
    c = config(path)
    w = ConfigWatch()
    w.poll(c)
    path.write_text("half")
    assert not w.poll(c)
    path.write_text("half and the rest")
    assert not w.poll(c)  # still changing
    assert w.poll(c)


def test_missing_file_is_no_change(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("a")
    c = config(path)
    w = ConfigWatch()
    w.poll(c)
    path.unlink()
    assert [w.poll(c), w.poll(c)] == [False, False]
    path.write_text("back, and different")
    assert [w.poll(c), w.poll(c)] == [False, True]


def test_off_looks_at_nothing_and_on_starts_from_the_file_then(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text("a")
    seen: list[str] = []

    def stat(p: str) -> tuple[int, int, int, int] | None:
        seen.append(p)
        st = os.stat(p)
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    w = ConfigWatch(stat)
    assert not w.poll(config(path, watch=False))
    assert seen == []
    path.write_text("changed while off")
    assert [w.poll(config(path)), w.poll(config(path))] == [False, False]
