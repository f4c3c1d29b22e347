"""sd_notify, as systemd sees it: a test-owned ``NOTIFY_SOCKET`` receives the gateway's
messages from a real ``l4gw run``, alone and with workers.

READY comes once every listener is open (in every worker), from the main
process (``NotifyAccess=main``); a SIGHUP reload is bracketed by RELOADING
(with MONOTONIC_USEC) and READY; SIGTERM sends STOPPING; the watchdog is
pinged; nothing comes from any other process.
"""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gwproc import free_port

pytestmark = pytest.mark.timeout(60)


class NotifySocket:
    """An ``AF_UNIX`` datagram socket playing systemd's part, with sender credentials."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.messages: list[tuple[int, dict[str, str]]] = []

    def next(self, timeout: float = 15) -> tuple[int, dict[str, str]]:
        """The next message that is not only STATUS= or WATCHDOG=1: (sender pid, fields)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next(
                struct.unpack("iII", d)[0]
                for level, kind, d in anc
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((pid, fields))
            if set(fields) - {"STATUS", "WATCHDOG"}:
                return pid, fields

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    try:
        yield n
    finally:
        n.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reloading_stopping_in_order(notify, gateway, workers):
    port = free_port()
    gw = gateway(
        f"""
[gateway]
drain_timeout = "1s"
workers = {workers}

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
name = "api"
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{free_port()}"]
""",
        # systemd's WatchdogSec=0.4s: a ping every 0.2 s.
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""},
        wait_ready=False,
    )
    main = gw.proc.pid

    pid, fields = notify.next()
    assert pid == main
    assert fields["READY"] == "1", fields
    assert "STATUS" in fields
    # Every worker's listener was open before READY.
    assert gw.log.count("ready: ") == workers
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

    gw.signal(signal.SIGHUP)
    pid, fields = notify.next()
    assert pid == main
    assert fields["RELOADING"] == "1", fields
    assert int(fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    try:
        pid, fields = notify.next()
    except TimeoutError:
        raise AssertionError(f"{notify.messages}\n{gw.log}")
    assert (pid, fields["READY"]) == (main, "1"), fields
    assert gw.log.count("reloaded ") == workers

    time.sleep(0.5)
    gw.signal(signal.SIGTERM)
    pid, fields = notify.next()
    assert (pid, fields.get("STOPPING")) == (main, "1"), fields
    assert gw.wait() == 0
    # Nothing else (a last ping or status may follow), and from no other process.
    with pytest.raises(TimeoutError):
        notify.next(timeout=0.3)
    assert {pid for pid, _ in notify.messages} == {main}
    assert sum(fields == {"WATCHDOG": "1"} for _, fields in notify.messages) >= 2
