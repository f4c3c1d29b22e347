"""The example third-party plugin (examples/plugin-geo-deny), installed as a package:
loaded by entry point, listed, configured from the file, and acting in ``l4gw run``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from backends import echo_server
from gwproc import free_port, l4gw


def test_listed_by_l4gw_plugins() -> None:
    out = l4gw("plugins")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    [row] = [i for i, line in enumerate(lines) if line.startswith("geo_deny ")]
    assert "l4gw-geo-deny 0.1.0" in lines[row] and "l4gw_geo_deny" in lines[row]
    assert lines[row + 1].split("hooks:")[1].split(", ") == [
        " admit",
        "config_sections",
        "configure",
    ]


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin-geo-deny"


@pytest.mark.timeout(60)
def test_the_examples_own_tests_pass() -> None:
    """The example shows plugin authors how to test; its tests must not rot."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=EXAMPLE,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def config(port: int, backend: int, access_log: Path, deny: str = '"127.0.0.2/32"') -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[plugin.geo_deny]
deny = [{deny}]
reset = true

[plugin.accesslog]
path = "{access_log}"
fields = ["client", "close_reason", "refused_by", "refused_rule", "attributes"]
"""


def test_check_reports_its_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config(1, 2, tmp_path / "a.log", deny='"127.0.0.2/32", "nope"'))
    out = l4gw("check", "-c", str(path))
    assert out.returncode != 0
    assert 'plugin.geo_deny.deny[1]: not a CIDR: "nope"' in out.stdout + out.stderr


async def echo_from(port: int, source: str) -> bool:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    got = b""
    with trio.fail_after(5):
        try:
            await sock.connect(("127.0.0.1", port))
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(b"ping")
                await stream.send_eof()
                while chunk := await stream.receive_some(100):
                    got += chunk
        except (OSError, trio.BrokenResourceError):
            return False
        finally:
            sock.close()
    return got == b"ping"


@pytest.mark.timeout(60)
async def test_refuses_a_denied_client_and_marks_the_span(nursery, gateway, tmp_path):
    backend = await nursery.start(echo_server)
    port = free_port()
    access_log = tmp_path / "access.log"
    gw = gateway(config(port, backend, access_log))

    assert await echo_from(port, "127.0.0.1") is True
    assert await echo_from(port, "127.0.0.2") is False
    assert await echo_from(port, "127.0.0.3") is True
    gw.wait_log(r"client=127\.0\.0\.2:\d+ .* refused by=geo_deny/deny 127\.0\.0\.2/32")

    deadline = time.monotonic() + 10
    while not access_log.exists() or access_log.read_text().count("\n") < 3:
        assert time.monotonic() < deadline, "three access-log lines expected"
        await trio.sleep(0.02)
    records = {
        r["client"].split(":")[0]: r for r in map(json.loads, access_log.read_text().splitlines())
    }
    denied = records["127.0.0.2"]
    assert denied["close_reason"] == "refused"
    assert (denied["refused_by"], denied["refused_rule"]) == ("geo_deny", "deny 127.0.0.2/32")
    assert denied["attributes"]["geo_deny.checked"] is True
    assert denied["attributes"]["geo_deny.denied_by"] == "127.0.0.2/32"
    for ip in ("127.0.0.1", "127.0.0.3"):
        assert records[ip]["refused_by"] is None
        assert records[ip]["attributes"]["geo_deny.checked"] is True
        assert "geo_deny.denied_by" not in records[ip]["attributes"]
