"""The TPROXY guard's decisions on reload and start (gateway/tproxy/guard.py), on plain
configs; its checks against the kernel are in tests/e2e/test_tproxy.py."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from gateway.config import Config
from gateway.tproxy import owner as tproxy_owner
from gateway.tproxy.guard import Guard
from gateway.tproxy.owner import Ownership, acquire

pytestmark = pytest.mark.timeout(30)


def make(manage: bool = True, **tproxy: Any) -> Config:
    raw: dict[str, Any] = {
        "listener": [{"name": "tp4", "bind": "0.0.0.0:15001", "transparent": True}],
        "route": [{"listener": "tp4", "cluster": "a"}],
        "cluster": {"a": {"endpoints": ["198.18.1.2:80"]}},
        "tproxy": {
            "manage": manage,
            "intercept": [{"listener": "tp4", "destination": ["198.18.2.0/24"]}],
            **tproxy,
        },
    }
    return config_mod.from_dict(raw, "gw.toml", {})


@pytest.fixture
def ownership(tmp_path: Path) -> Iterator[Ownership]:
    held = acquire("gw.toml", "l4gw run", tmp_path)
    try:
        yield held
    finally:
        held.release()
        tproxy_owner._held = None


def test_reload_with_the_same_plan_changes_only_the_interval(ownership: Ownership) -> None:
    guard = Guard(ownership, make())
    assert guard.interval == 5.0
    guard.follow(make(check_interval="1s"))
    assert guard.interval == 1.0 and guard._pending is None
    assert guard.installed.tproxy is not None and guard.installed.tproxy.check_interval == 1.0


def test_reload_with_another_plan_is_applied_by_the_next_check(ownership: Ownership) -> None:
    installed = make()
    guard = Guard(ownership, installed)
    new = make(mark=7)
    guard.follow(new)
    assert guard._pending is new
    assert guard.installed is installed  # until the apply succeeded


def test_reload_without_manage_keeps_guarding_what_is_installed(
    ownership: Ownership, caplog: pytest.LogCaptureFixture
) -> None:
    installed = make()
    guard = Guard(ownership, installed)
    with caplog.at_level(logging.WARNING, "l4gw.tproxy"):
        guard.follow(make(manage=False, mark=7))
    assert guard._pending is None and guard.installed is installed
    assert "has no [tproxy] manage = true" in caplog.text


def test_a_guard_that_stood_down_follows_nothing(ownership: Ownership) -> None:
    guard = Guard(ownership, make())
    guard.stats.stood_down = "l4gw tproxy teardown --force (pid 1) at -"
    guard.follow(make(mark=7))
    assert guard._pending is None


def test_for_process_only_where_the_state_was_set_up(ownership: Ownership) -> None:
    serving = make()
    assert Guard.for_process(serving) is None  # owned, but nothing installed yet
    ownership.installed = serving
    guard = Guard.for_process(serving)
    assert guard is not None and guard._pending is None
    # A worker restarted after a reload serves a newer config: its plan is applied first.
    newer = make(table=200)
    restarted = Guard.for_process(newer)
    assert restarted is not None and restarted._pending is newer
    report = restarted.status()
    assert report["restored"] == 0 and report["intact"] is True
    assert report["config"] == "gw.toml" and report["check_interval"] == 5.0


def test_no_guard_without_ownership() -> None:
    assert tproxy_owner.held() is None
    assert Guard.for_process(make()) is None
