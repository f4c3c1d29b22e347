"""Run a real ``l4gw run -c FILE`` process for end-to-end tests.

The gateway under test is started exactly as users start it: a config file
on disk and the console command, its log captured to a file the test reads.
That part is public, :class:`gateway.testing.GatewayProcess` (plugin authors use
it too); this module adds what only this suite needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from gateway import testing
from gateway.identity import resolve_identity
from gateway.process import unreadable_installation

L4GW = list(testing.L4GW_COMMAND)


class GatewayProcess(testing.GatewayProcess):
    """:class:`gateway.testing.GatewayProcess` with this suite's calling convention:
    ``(workdir, config, name)`` positional, ``netns`` to run it in a namespace, and
    :data:`L4GW` read when it is made (tests monkeypatch it)."""

    def __init__(self, workdir: Path, config: str, name: str = "gw", env: dict[str, str] | None = None,
                 netns: str | None = None, prefix: list[str] | None = None,
                 command: list[str] | None = None) -> None:
        netns_prefix = ["ip", "netns", "exec", netns] if netns else []
        super().__init__(config, workdir=workdir, name=name, env=env,
                         prefix=[*netns_prefix, *(prefix or [])], command=command or L4GW)
        self.netns = netns


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and never one this process handed out before:
    the kernel may offer the same free port twice in a row, and a test that opens one
    listener after closing another (a reload) would then see the old one still there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
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


@contextlib.contextmanager
def installation_readable_by(user: str) -> Iterator[None]:
    """Let ``user`` enter every directory on the way to what :func:`readable_l4gw` runs
    (the checkout, this venv's site-packages, the system's Python), for the test's
    duration: a checkout under a home only root may enter (/root, mode 0700) would make
    the gateway refuse to drop to ``user``. Each directory that blocks gets o+x (enter,
    not list) and its mode back afterwards; on a checkout anyone may read, nothing
    changes."""
    import gateway  # the checkout the editable install points at

    identity = resolve_identity(user, "")
    paths = [os.path.dirname(os.path.dirname(os.path.abspath(gateway.__file__))),
             SITE_PACKAGES, os.path.dirname(SYSTEM_PYTHON)]
    changed: list[tuple[str, int]] = []
    try:
        while (blocked := unreadable_installation(identity, paths)) is not None:
            mode = os.stat(blocked).st_mode & 0o7777
            assert mode & 0o005 != 0o005, f"{blocked} stays unreadable"
            changed.append((blocked, mode))
            os.chmod(blocked, mode | 0o001)  # enter; list too only where still needed
            if unreadable_installation(identity, paths) == blocked:
                os.chmod(blocked, mode | 0o005)
        yield
    finally:
        for path, mode in reversed(changed):
            os.chmod(path, mode)
