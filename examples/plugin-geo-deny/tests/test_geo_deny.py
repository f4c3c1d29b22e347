"""How a plugin author tests a plugin: pure lookups, then the plugin driven by
l4gw's own plugin manager and config loader (no process, no sockets)."""

from __future__ import annotations

import ipaddress
import tomllib

import l4gw_geo_deny
import pytest
import trio

from gateway import Flow, Refusal
from gateway.config import ConfigError, from_dict
from gateway.plugin_manager import load

CONFIG = """
[[listener]]
name = "public"
bind = "127.0.0.1:8443"

[plugin.geo_deny]
deny = ["198.18.7.0/24", "2001:db8:bad::/48", "10.0.0.0/8"]
allow = ["198.18.7.10/32"]
"""


def test_most_specific_network_wins() -> None:
    nets = l4gw_geo_deny.NetworkSet(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "::/0")
    )
    assert str(nets.match(ipaddress.ip_address("10.1.2.3"))) == "10.1.0.0/16"
    assert str(nets.match(ipaddress.ip_address("10.2.2.3"))) == "10.0.0.0/8"
    assert nets.match(ipaddress.ip_address("11.0.0.1")) is None
    assert str(nets.match(ipaddress.ip_address("2001:db8::1"))) == "::/0"


def test_deny_allow() -> None:
    section = from_dict(tomllib.loads(CONFIG), "t", {"geo_deny": l4gw_geo_deny.SCHEMA})
    rules = l4gw_geo_deny.Rules.from_section(section.plugin("geo_deny"))
    assert str(rules.denied_by("198.18.7.9")) == "198.18.7.0/24"
    assert rules.denied_by("198.18.7.10") is None
    assert str(rules.denied_by("2001:db8:bad:1::5")) == "2001:db8:bad::/48"
    assert rules.denied_by("192.0.2.1") is None


def test_config_errors_have_key_paths() -> None:
    raw = tomllib.loads(CONFIG.replace('"10.0.0.0/8"', '"ten"'))
    with pytest.raises(ConfigError) as err:
        from_dict(raw, "t", {"geo_deny": l4gw_geo_deny.SCHEMA})
    assert err.value.problems == ['plugin.geo_deny.deny[2]: not a CIDR: "ten"']


def test_loaded_by_entry_point_and_refusing() -> None:
    plugins = load()  # the installed plugins, by entry point, as `l4gw run` does
    info = {i.name: i for i in plugins.infos}["geo_deny"]
    assert info.distribution == "l4gw-geo-deny"
    config = from_dict(tomllib.loads(CONFIG), "t", plugins.schemas())
    plugins.call_all("l4gw_configure", config=config)

    def admit(ip: str) -> tuple[str, Refusal] | None:
        flow = Flow(1, "public", "tcp", (ip, 5000), ("127.0.0.1", 8443))
        return trio.run(lambda: plugins.decide("l4gw_admit", False, flow=flow))

    refused = admit("198.18.7.77")
    assert refused is not None and refused[0] == "geo_deny"
    assert refused[1].rule == "deny 198.18.7.0/24"
    assert admit("192.0.2.1") is None
