"""examples/systemd/l4gw.service passes ``systemd-analyze verify`` and asks for what the
gateway does: Type=notify (it sends READY=1 itself), the supervisor alone notifying,
SIGHUP reloads, a watchdog it pings, and capabilities no wider than it needs.

``systemd-analyze verify`` checks that ExecStart= binaries exist, so the unit is
verified with its /opt/l4gw/bin/l4gw pointing at this checkout's l4gw. Any line
it prints (an unknown option, a value this systemd cannot parse: ``Type=notify-reload``
on systemd 252 is only a warning) fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "examples" / "systemd" / "l4gw.service"


def service_section() -> dict[str, list[str]]:
    """The [Service] options, each with every value it is given (ExecReload= twice)."""
    options: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            options.setdefault(key, []).append(value)
    return options


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing under CI (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    l4gw = Path(sys.executable).with_name("l4gw")
    assert l4gw.exists(), l4gw
    unit = tmp_path / "l4gw.service"
    unit.write_text(UNIT.read_text().replace("/opt/l4gw/bin/l4gw", str(l4gw)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_the_unit_asks_for_what_the_gateway_does():
    options = service_section()
    assert options["Type"] == ["notify"]
    assert options["NotifyAccess"] == ["main"]
    assert options["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert options["WatchdogSec"]
    assert "LimitNOFILE" in options
    caps = set(options["CapabilityBoundingSet"][0].split())
    assert caps == set(options["AmbientCapabilities"][0].split())
    assert caps <= {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_BPF", "CAP_PERFMON"}
    assert options["ProtectSystem"] == ["strict"] and options["RuntimeDirectory"] == ["l4gw"]
    assert options["NoNewPrivileges"] == ["yes"]
    assert set(options["RestrictAddressFamilies"][0].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    assert "Type=notify-reload" in UNIT.read_text()  # the comment for systemd >= 253
