"""The TPROXY ownership lock (gateway/tproxy/owner.py): real flocks on files in a temp dir,
real forked processes; no kernel TPROXY state is touched."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.tproxy import owner as tproxy_owner
from gateway.tproxy.owner import (
    Held,
    OwnershipError,
    acquire,
    lock_path,
    mark_forced,
    netns_inode,
    probe,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "run"
    # An Ownership taken in a test is this process's "held" one: forget it.
    tproxy_owner._held = None


def test_one_owner_and_the_second_is_told_who(run_dir: Path) -> None:
    first = acquire("/etc/l4gw/a.toml", "l4gw run", run_dir)
    with pytest.raises(Held) as caught:
        acquire("/etc/l4gw/a.toml", "l4gw run", run_dir)
    owner = caught.value.owner
    assert owner is not None
    assert (owner.pid, owner.config, owner.command) == (os.getpid(), "/etc/l4gw/a.toml", "l4gw run")
    assert f"pid {os.getpid()}, config /etc/l4gw/a.toml, since " in str(caught.value)
    assert f"net:[{netns_inode()}]" in str(caught.value)
    found = probe(run_dir)
    assert found.live and found.owner == first.owner and found.guard is None
    first.release()


def test_release_removes_the_file_and_frees_the_lock(run_dir: Path) -> None:
    ownership = acquire("a.toml", "l4gw run", run_dir)
    path = lock_path(netns_inode(), run_dir)
    assert path.exists()
    ownership.release()
    assert not path.exists()
    assert probe(run_dir) == tproxy_owner.Probe(False, None, None, netns_inode())
    again = acquire("b.toml", "l4gw run", run_dir)
    again.release()


def test_a_record_without_a_lock_is_history(run_dir: Path) -> None:
    """What a killed owner leaves: its record, unlocked. Reported as gone; the next
    acquire takes the lock and writes its own record."""
    ownership = acquire("old.toml", "l4gw run", run_dir)
    os.close(ownership.fd)  # the kernel drops the lock as it would at kill -9
    ownership.fd = -1
    found = probe(run_dir)
    assert not found.live and found.owner is not None and found.owner.config == "old.toml"
    new = acquire("new.toml", "l4gw run", run_dir)
    assert probe(run_dir).owner == new.owner
    new.release()


def test_forked_workers_keep_it_until_the_last_exits(run_dir: Path) -> None:
    """The lock belongs to the open file description: a forked child holds it after the
    parent let go of its descriptor, and the kernel frees it when the child dies."""
    ownership = acquire("a.toml", "l4gw run", run_dir)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps
        time.sleep(30)
        os._exit(0)
    try:
        os.close(ownership.fd)  # as if the supervisor were gone
        ownership.fd = -1
        assert probe(run_dir).live
        with pytest.raises(Held):
            acquire("b.toml", "l4gw run", run_dir)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert not probe(run_dir).live
    acquire("b.toml", "l4gw run", run_dir).release()


def test_release_in_a_forked_worker_keeps_the_lock(run_dir: Path) -> None:
    ownership = acquire("a.toml", "l4gw run", run_dir)
    child = os.fork()
    if child == 0:  # pragma: no cover - checked through the exit code
        ownership.release()  # not the owner's process: must not unlink or unlock
        os._exit(0 if ownership.path.exists() else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert probe(run_dir).live
    ownership.release()


def test_the_record_carries_the_guard_report_and_is_never_torn(run_dir: Path) -> None:
    ownership = acquire("a.toml", "l4gw run", run_dir)
    ownership.publish({"restored": 3, "last_differences": ["x" * 5000]})
    ownership.publish({"restored": 4, "last_differences": []})  # shorter: truncated
    found = probe(run_dir)
    assert found.guard == {"restored": 4, "last_differences": []}
    # A half-written record is not taken for one.
    os.pwrite(ownership.fd, b'{"seq": 9, "owner": {"pid": 1', 0)
    os.ftruncate(ownership.fd, 30)
    assert probe(run_dir).owner is None
    ownership.release()


def test_forced_marker_names_one_owner(run_dir: Path) -> None:
    ownership = acquire("a.toml", "l4gw run", run_dir)
    assert ownership.forced() is None
    # A marker for an earlier owner (another start time) does not count.
    earlier = tproxy_owner.Owner(ownership.owner.pid, "a.toml", 1.0, "l4gw run")
    mark_forced(earlier, "l4gw tproxy teardown --force", ownership.netns, run_dir)
    assert ownership.forced() is None
    mark_forced(ownership.owner, "l4gw tproxy teardown --force", ownership.netns, run_dir)
    forced = ownership.forced()
    assert forced is not None and forced.by == "l4gw tproxy teardown --force"
    assert forced.describe().startswith(f"l4gw tproxy teardown --force (pid {os.getpid()}) at ")
    marker = tproxy_owner.forced_path(ownership.netns, run_dir)
    assert json.loads(marker.read_text())["owner_pid"] == os.getpid()
    ownership.release()
    assert not marker.exists()


def test_a_new_owner_clears_an_old_marker(run_dir: Path) -> None:
    old = acquire("a.toml", "l4gw run", run_dir)
    mark_forced(old.owner, "l4gw tproxy setup --force", old.netns, run_dir)
    os.close(old.fd)
    old.fd = -1
    new = acquire("a.toml", "l4gw run", run_dir)
    assert not tproxy_owner.forced_path(new.netns, run_dir).exists()
    new.release()


def test_a_directory_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OwnershipError, match=rf"cannot write {blocker}/run: "):
        acquire("a.toml", "l4gw run", blocker / "run")
