"""The acl plugin: deny lists in the shield and in admit, following reloads."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_network

import pytest

from gateway.config import ConfigError
from gateway.shield import table
from gateway.shield.never import NeverList
from gateway.testing import load_plugins, make_config, make_flow, run_decisions
from l4gw_plugins.acl import Acl

from shieldtable import installed

ROUTED = """
[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
name = "main"
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:2"]
"""


@pytest.fixture
def shield() -> Iterator[table.Shield]:
    """A fresh table of this test (kernel off); the gateway's own address is 198.18.0.2."""
    never = NeverList.build(local=[("eth0", ip_network("198.18.0.2/32"))])
    with installed(table.Shield(None, never=never)) as fresh:
        yield fresh


def configure(acl: Acl, deny: list[str]) -> None:
    acl.configure({"deny": tuple(ip_network(d) for d in deny), "refuse_with": "rst"})


def test_deny_is_shielded_and_refused_in_admit_with_a_reason(shield: table.Shield) -> None:
    acl = Acl()
    configure(acl, ["198.51.100.0/24", "2001:db8:bad::/48"])
    listed = {str(e.network): e for e in shield.entries()}
    assert set(listed) == {"198.51.100.0/24", "2001:db8:bad::/48"}
    assert all(e.source == "acl" and e.deadline_ns == 0 for e in listed.values())
    refusal = acl.admit(make_flow(client="2001:db8:bad::7"))
    assert refusal is not None
    assert (refusal.rule, refusal.reason, refusal.reset) == (
        "deny",
        "acl deny 2001:db8:bad::/48",
        True,
    )
    mapped = acl.admit(make_flow(client="::ffff:198.51.100.9"))
    assert mapped is not None and mapped.reason == "acl deny 198.51.100.0/24"
    assert acl.admit(make_flow(client="198.51.101.1")) is None


async def test_deny_through_the_core_decisions(shield: table.Shield) -> None:
    plugins = load_plugins()
    config = make_config(ROUTED + '[plugin.acl]\ndeny = ["198.51.100.0/24"]\n', plugins)
    decision = await run_decisions(
        plugins, config, make_flow(client="198.51.100.3", listener="public")
    )
    assert (decision.close_reason, decision.refused_by, decision.refused_rule) == (
        "refused",
        "acl",
        "deny",
    )
    assert decision.error == "acl deny 198.51.100.0/24"
    ok = await run_decisions(plugins, config, make_flow(client="198.51.99.3", listener="public"))
    assert ok.ok


def test_reload_removes_what_left_the_list(shield: table.Shield) -> None:
    acl = Acl()
    configure(acl, ["198.51.100.0/24", "203.0.113.0/24"])
    shield.add("192.0.2.1", 60, "flood", source="ratelimit")
    configure(acl, ["203.0.113.0/24"])
    assert {str(e.network) for e in shield.entries()} == {"203.0.113.0/24", "192.0.2.1/32"}
    assert acl.admit(make_flow(client="198.51.100.3")) is None
    assert shield.changes["remove"] == 1


def test_deny_on_the_never_list_is_refused_in_admit_only(
    shield: table.Shield, caplog: pytest.LogCaptureFixture
) -> None:
    acl = Acl()
    configure(acl, ["198.18.0.0/24"])
    assert shield.entries() == []
    assert "acl: deny 198.18.0.0/24 is refused in admit only: never shielded" in caplog.text
    refusal = acl.admit(make_flow(client="198.18.0.9"))
    assert refusal is not None and refusal.rule == "deny"


def test_every_shield_entry_is_refused_in_admit(shield: table.Shield) -> None:
    """With the kernel shield off, an operator's or a plugin's entry still keeps clients out."""
    acl = Acl()
    configure(acl, [])
    shield.add("192.0.2.0/24", 60, "from a feed", source="feedplugin")
    refusal = acl.admit(make_flow(client="192.0.2.44"))
    assert refusal is not None and refusal.rule == "shield"
    assert refusal.reason == "shielded 192.0.2.0/24 (from a feed; source feedplugin)"


def test_a_bad_deny_is_a_config_error() -> None:
    plugins = load_plugins()
    with pytest.raises(ConfigError) as caught:
        make_config('[plugin.acl]\ndeny = ["198.51.100.0/33"]\n', plugins, configure=False)
    assert "plugin.acl.deny[0]" in str(caught.value.problems)
