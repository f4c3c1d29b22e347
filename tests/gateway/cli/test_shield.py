"""``l4gw shield``: where it finds the gateway, what it prints, how it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import shield
from gateway.cli.main import main
from gateway.testing import make_config

from gwproc import free_port

BASE = """
[[listener]]
name = "web"
bind = "127.0.0.1:0"
[[route]]
listener = "web"
cluster = "be"
[cluster.be]
endpoints = ["127.0.0.1:9"]
"""


@pytest.mark.parametrize(
    "bind,url",
    [
        ("0.0.0.0:9901", "http://127.0.0.1:9901/shield"),
        ("[::]:9901", "http://[::1]:9901/shield"),
        ("127.0.0.2:8000", "http://127.0.0.2:8000/shield"),
    ],
)
def test_the_admin_url_reaches_a_wildcard_bind_on_loopback(bind: str, url: str) -> None:
    config = make_config(BASE + f'[admin]\nbind = "{bind}"\ntoken = "t"\n')
    assert shield.admin_url(config) == url


def test_listing_text() -> None:
    text = shield.format_listing(
        {
            "kernel": {"enabled": True, "mode": "tc"},
            "entries": [
                {"cidr": "198.51.100.0/24", "reason": "scan", "source": "admin", "drops": 41,
                 "expires_in": 118.2},
                {"cidr": "2001:db8:bad::/48", "reason": "deny", "source": "acl", "drops": 0,
                 "expires_in": None},
            ],
        }
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "kernel shield: on (tc)"
    assert lines[1].startswith("198.51.100.0/24") and "expires    1m58s" in lines[1]
    assert lines[1].endswith("drops       41  admin: scan")
    assert "expires    never" in lines[2] and lines[2].endswith("acl: deny")
    off = shield.format_listing(
        {"kernel": {"enabled": False, "why_off": "no [shield] section"}, "entries": []}
    )
    assert off == "kernel shield: off (no [shield] section); enforced in admit\nno entries"


def test_no_admin_endpoint_or_no_gateway_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(BASE)
    assert main(["shield", "list", "-c", str(path)]) == 1
    assert "no [admin] section: l4gw shield talks to the admin endpoint" in capsys.readouterr().err
    path.write_text(BASE + f'[admin]\nbind = "127.0.0.1:{free_port()}"\n')
    assert main(["shield", "add", "-c", str(path), "198.51.100.7", "--ttl", "2m"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("l4gw shield: cannot reach the gateway at http://127.0.0.1:")
        and err.count("\n") == 1
    )
    path.write_text("[[listener]]\n")
    assert main(["shield", "list", "-c", str(path)]) == 2
