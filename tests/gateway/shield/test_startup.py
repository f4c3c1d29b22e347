"""``[shield]`` in the config, the ports the program drops toward, and loading it for
a gateway: a shield that cannot load is one line, and the gateway runs without it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.config import ConfigError
from gateway.shield import frames
from gateway.shield.kernel import XDP_DROP, XDP_PASS, KernelShield
from gateway.shield.ports import ports_of
from gateway.shield.table import Shield
from gateway.testing import make_config

from gwproc import GatewayProcess

BASE = """
[[listener]]
name = "web"
bind = "127.0.0.1:8443"
[[listener]]
name = "dns"
bind = "127.0.0.1:5353"
protocol = "udp"
[[listener]]
name = "tp"
bind = "127.0.0.1:15001"
transparent = true
[[route]]
listener = "web"
cluster = "be"
[cluster.be]
endpoints = ["127.0.0.1:9"]
"""
TPROXY = """
[tproxy]
[[tproxy.intercept]]
listener = "tp"
interfaces = ["eth1", "eth2"]
destination = ["198.18.2.0/24"]
ports = [80, 443]
[[tproxy.intercept]]
listener = "tp"
interfaces = ["eth2"]
destination = ["198.18.3.0/24"]
"""


def test_shield_section_defaults_to_the_intercepted_interfaces() -> None:
    config = make_config(BASE + TPROXY + "[shield]\n")
    assert config.shield is not None
    assert config.shield.interfaces == ("eth1", "eth2")
    assert (config.shield.mode, config.shield.max_entries, config.shield.never) == (
        "auto",
        65536,
        (),
    )
    assert make_config(BASE).shield is None


@pytest.mark.parametrize(
    "section,problem",
    [
        (
            "[shield]\n",
            "shield.interfaces: required (no [[tproxy.intercept]] names its interfaces)",
        ),
        ('[shield]\ninterfaces = ["a-very-long-ifname"]\n', "shield.interfaces[0]: "),
        ('[shield]\ninterfaces = ["eth0"]\nmode = "netlink"\n', "shield.mode: "),
        ('[shield]\ninterfaces = ["eth0"]\nnever = ["10.0.0.0/33"]\n', "shield.never[0]: "),
        ('[shield]\ninterfaces = ["eth0"]\nmax_entries = 0\n', "shield.max_entries: "),
    ],
)
def test_bad_shield_sections_name_the_key(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config(BASE + section)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_ports_are_the_listeners_and_the_intercepted_ones() -> None:
    config = make_config(BASE + TPROXY + "[shield]\n")
    # The intercept without ports adds none: never every port of the host.
    assert ports_of(config) == (frozenset({8443, 15001, 80, 443}), frozenset({5353}))


@pytest.mark.privileged
def test_the_ports_follow_a_reload() -> None:
    syn = frames.tcp_frame("198.18.0.2", "198.18.2.10", 8443)
    with KernelShield.load([], "auto", 16, [], []) as kernel:
        table = Shield(kernel=kernel)
        table.configure(
            make_config(BASE.replace(":8443", ":8444") + "[shield]\ninterfaces=['lo']\n")
        )
        table.add("198.18.0.2", 60.0, "test", source="test")
        assert kernel.test_run(syn, xdp=True) == XDP_PASS
        table.configure(make_config(BASE + "[shield]\ninterfaces=['lo']\n"))
        assert kernel.test_run(syn, xdp=True) == XDP_DROP
        table.close()


@pytest.mark.privileged
def test_a_shield_that_cannot_load_is_one_line_and_the_gateway_runs(
    gateway: Callable[..., GatewayProcess],
) -> None:
    gw = gateway(BASE.replace("8443", "0").replace("5353", "0").replace("15001", "0")
                 + '[shield]\ninterfaces = ["l4gw-none0"]\n')  # fmt: skip
    lines = [line for line in gw.log.splitlines() if "shield" in line and "ERROR" in line]
    assert len(lines) == 1, gw.log
    assert "shield: cannot attach to l4gw-none0: " in lines[0]
    assert "running without it (listed clients are refused in admit)" in lines[0]
    assert gw.stop() == 0
