"""gateway.sdnotify: datagrams to a real AF_UNIX socket (a path, or the abstract
namespace), the environment taken, the watchdog rule, and the supervisor's
aggregation of its workers' reports."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import sdnotify
from gateway.sdnotify import Notifier, WorkerReports, one_line, take, watchdog_interval


class Receiver:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(2)

    def fields(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        assert data.endswith(b"\n")
        return dict(line.split("=", 1) for line in data.decode().splitlines())

    def empty(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2)
        return False


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    address = str(tmp_path / "notify")
    r = Receiver(address)
    yield address, r
    r.sock.close()


def test_path_and_abstract_sockets(path_receiver):
    address, r = path_receiver
    n = Notifier(address)
    assert n.ready("serving 2 listeners\nsecond line")
    assert r.fields() == {"READY": "1", "STATUS": "serving 2 listeners"}
    abstract = f"@l4gw-test-{os.getpid()}"
    a = Receiver(abstract)
    try:
        assert Notifier(abstract).reloading()
        got = a.fields()
        assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
    finally:
        a.sock.close()


def test_no_socket_or_a_gone_one_never_fails(tmp_path):
    assert not Notifier().enabled and not Notifier().ready("x")
    assert not Notifier(str(tmp_path / "nobody-listens")).stopping()


def test_take_removes_the_variables(path_receiver):
    address, r = path_receiver
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000", "OTHER": "1"}
    n = take(env)
    try:
        assert env == {"OTHER": "1"}
        assert sdnotify.current() is n and n.watchdog == 2.0
        assert n.ping() and r.fields() == {"WATCHDOG": "1"}
    finally:
        sdnotify.use(Notifier())


def test_watchdog_is_ours_only():
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "1000000"}, pid) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(pid)}, pid) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid) is None
    assert watchdog_interval({}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, pid) is None


def test_one_line():
    assert one_line("a\nb") == "a" and one_line("") == ""
    assert len(one_line("x" * 500)) == 200


def test_supervisor_says_ready_once_every_worker_is(path_receiver):
    address, r = path_receiver
    reports = WorkerReports(2, Notifier(address))
    workers = [Notifier(sock=reports._theirs, tag=f"L4GW_WORKER={i}") for i in (0, 1)]
    reports.started(0)
    reports.started(1)
    workers[0].ready("serving 1 listeners")
    reports._read()
    assert r.empty()  # one of two
    workers[1].ready("serving 1 listeners")
    reports._read()
    assert r.fields() == {"READY": "1", "STATUS": "2 workers ready"}

    reports.reloading()  # from the signal handler: a marker, applied in queue order
    assert r.empty()
    reports._read()
    assert r.fields()["RELOADING"] == "1"
    workers[0].reloading()
    workers[0].ready("reloaded x")
    workers[1].ready("reload failed, the running config stays: bad")
    reports._read()
    assert r.fields() == {
        "READY": "1",
        "STATUS": "2 workers ready; worker 1: reload failed, the running config stays: bad",
    }

    reports.exited(1)
    assert "worker 1 exited" in r.fields()["STATUS"]
    reports.started(1)
    workers[1].ready("serving")
    reports._read()
    assert r.fields() == {"STATUS": "2 workers ready"}  # READY was said already

    reports.stopping()
    assert r.fields()["STOPPING"] == "1"
    reports.stopping()
    assert r.empty()
