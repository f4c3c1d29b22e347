"""Run a real ``l4gw run -c FILE`` process for end-to-end tests.

The gateway under test is started exactly as users start it: a config file
on disk and the console command, its log captured to a file the test reads.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import trio

L4GW = [sys.executable, "-m", "gateway.cli"]


class GatewayProcess:
    """One gateway process; ``stop()`` is safe to call twice."""

    def __init__(self, workdir: Path, config: str, name: str = "gw", env: dict[str, str] | None = None,
                 netns: str | None = None, prefix: list[str] | None = None,
                 command: list[str] | None = None) -> None:
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.log_path = workdir / f"{name}.log"
        self.config_path.write_text(config)
        self.env = {**os.environ, **(env or {})}
        self.netns = netns
        self.prefix = prefix or []
        """A command the gateway runs under (``prlimit ...``, ``setpriv ...``)."""
        self.command = command or L4GW
        """How ``l4gw`` is started (another interpreter, say)."""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 15) -> GatewayProcess:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, *self.prefix, *self.command, "run", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        if wait_ready:
            self.wait_log(r"ready: ", timeout)
        return self

    def write_config(self, config: str) -> None:
        """Replace the config file atomically, as an operator's deploy should: a
        reload must never read half a file."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config)
        os.replace(tmp, self.config_path)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 10, count: int = 1) -> str:
        """Wait until ``pattern`` (a regex) occurs ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway exited ({self.proc.returncode}) waiting for "
                                     f"{pattern!r}; log:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout waiting for {pattern!r}; log:\n{text}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def refused(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing accepts a connection on ``host:port`` (the listener is closed)."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


def l4gw(*args: str, timeout: float = 30, netns: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short ``l4gw`` command (check, plugins, tproxy ...) and capture its output."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *L4GW, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


SITE_PACKAGES = sysconfig.get_paths()["purelib"]
SYSTEM_PYTHON = "/usr/bin/python3"


def readable_l4gw() -> dict[str, Any]:
    """``command`` and ``env`` for :class:`GatewayProcess`: ``l4gw`` on the system's Python
    with this venv's packages, for a gateway that drops to another user (``[gateway]
    user``): this machine's venv interpreter lives under /root, which no other user may
    enter. The same minor version, so the venv's compiled packages load."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(sys.version_info[:2]), probe.stdout
    launcher = ("import site, sys; site.addsitedir(sys.argv.pop(1)); "
                "from gateway.cli.main import main; sys.exit(main())")
    return {"command": [SYSTEM_PYTHON, "-c", launcher, SITE_PACKAGES],
            "env": {"PYTHONPATH": SITE_PACKAGES}}
