"""A real, throwaway ``redis-server`` on a free loopback port for tests.

No persistence (``--save "" --appendonly no``), its files in the test's temp
directory; ``kill()`` simulates an outage and ``start()`` brings it back on
the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from gwproc import free_port


class RedisServer:
    """One redis-server process; ``stop()`` is safe to call twice."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (scripts/install.sh installs it)"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.ping():
            assert self.proc.poll() is None, f"redis-server exited: {self.log_path.read_text()}"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                # A server with a password answers -NOAUTH: up all the same.
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: an outage, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
