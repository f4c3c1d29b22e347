"""``l4gw check --resolve`` against a real dnsmasq: every name once, failures named, exit 1."""

from __future__ import annotations

import json

import pytest

from dnsmasq import Dnsmasq, Srv
from dnsmasq import dns_server as dns_server  # the fixture
from gwproc import l4gw

pytestmark = pytest.mark.timeout(60)


def config(server: Dnsmasq, endpoints: str, extra: str = "") -> str:
    return f"""
[dns]
servers = ["{server.server}"]
timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = {endpoints}
{extra}
"""


def test_check_resolve_prints_each_name_and_fails_on_a_missing_one(dns_server, tmp_path):
    api, t1 = dns_server.name("api"), dns_server.name("t1")
    srv, missing = dns_server.name("_api._tcp"), dns_server.name("missing")
    dns_server.set_hosts({api: ["127.0.0.11", "127.0.0.12"], t1: ["127.0.0.21"]})
    dns_server.set_srv([Srv(srv, t1, 8001, priority=10, weight=60)])
    path = tmp_path / "gw.toml"

    path.write_text(config(dns_server, f'["{api}:8080", {{ srv = "{srv}" }}, "127.0.0.1:9"]'))
    assert l4gw("check", "-c", str(path)).returncode == 0  # names are not resolved
    done = l4gw("check", "--resolve", "-c", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cluster api: {api}:8080 -> 127.0.0.11:8080, 127.0.0.12:8080" in done.stdout
    assert f"cluster api: SRV {srv} -> 127.0.0.21:8001 (priority 10, weight 60)" in done.stdout
    assert f"DNS servers: {dns_server.server}" in done.stdout

    file = tmp_path / "api.json"
    file.write_text(json.dumps([f"{missing}:80", "127.0.0.1:9"]))
    path.write_text(
        config(dns_server, f'["{api}:8080"]').replace(
            f'endpoints = ["{api}:8080"]', f'endpoints_file = "{file}"'
        )
    )
    done = l4gw("check", "--resolve", "-c", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cluster api: {missing}:80: FAILED (nxdomain)" in done.stdout
    assert "resolve: 1 names, 1 failed" in done.stdout
