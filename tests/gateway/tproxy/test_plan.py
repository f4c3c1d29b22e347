"""The TPROXY plan, the state comparison and the doctor's judgement: pure functions, plain values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from gateway.config import Config, ConfigError
from gateway.tproxy.doctor import FAIL, OK, WARN, Facts, diagnose, has_cap_net_admin
from gateway.tproxy.plan import (
    CHAIN_PRIORITY,
    ChainState,
    ForeignRule,
    IpRule,
    LocalRoute,
    State,
    TproxyError,
    conflicts,
    differences,
    nft_teardown,
    plan,
)
from gateway.tproxy.sockdiag import ListeningSocket


def make(
    intercepts: list[dict[str, Any]] | None = None,
    upstream_source: str = "client",
    listeners: list[dict[str, Any]] | None = None,
    **tproxy: Any,
) -> Config:
    raw: dict[str, Any] = {
        "listener": listeners
        or [
            {"name": "tp4", "bind": "0.0.0.0:15001", "transparent": True},
            {"name": "tp6", "bind": "[::]:15001", "transparent": True},
        ],
        "route": [{"listener": "tp4", "cluster": "a"}],
        "cluster": {"a": {"endpoints": ["198.18.1.2:80"], "upstream_source": upstream_source}},
        "tproxy": {
            "intercept": intercepts
            if intercepts is not None
            else [
                {"listener": "tp4", "destination": ["198.18.2.0/24"], "ports": [80]},
                {"listener": "tp6", "destination": ["fd00:2::/64"], "interfaces": ["eth0"]},
            ],
            **tproxy,
        },
    }
    return config_mod.from_dict(raw, "gw.toml", {})


def matches(rule_expr: tuple[Any, ...]) -> dict[str, Any]:
    """{left key: right} for the rule's match statements, e.g. {"iifname": "eth0"}."""
    out = {}
    for stmt in rule_expr:
        if "match" in stmt:
            left = stmt["match"]["left"]
            key = left.get("meta", {}).get("key") or left.get("payload", {}).get("field")
            key = key or left.get("socket", {}).get("key")
            out[key] = stmt["match"]["right"]
    return out


def statement(rule_expr: tuple[Any, ...], kind: str) -> Any:
    return next(stmt[kind] for stmt in rule_expr if kind in stmt)


# --- plan ---------------------------------------------------------------------------------


def test_plan_rules_in_order_per_intercept_and_family() -> None:
    p = plan(make())
    labels = [r.label for r in p.rules]
    assert labels == [
        "transparent sockets",
        "intercept[0] tp4 ipv4 tproxy",
        "intercept[0] tp4 ipv4 fail-closed",
        "intercept[1] tp6 ipv6 tproxy",
        "intercept[1] tp6 ipv6 fail-closed",
    ]
    sock = p.rules[0].expr
    assert matches(sock) == {"l4proto": "tcp", "transparent": 1}
    assert statement(sock, "mangle")["value"] == 1
    assert {"accept": None} in sock

    v4 = p.rules[1].expr
    assert matches(v4) == {
        "l4proto": "tcp",
        "daddr": {"prefix": {"addr": "198.18.2.0", "len": 24}},
        "dport": 80,
    }
    assert statement(v4, "tproxy") == {"family": "ip", "port": 15001}
    assert matches(p.rules[2].expr) == matches(v4)
    assert statement(p.rules[2].expr, "reject") == {"type": "tcp reset"}

    v6 = p.rules[3].expr
    assert matches(v6) == {
        "l4proto": "tcp",
        "iifname": "eth0",
        "daddr": {"prefix": {"addr": "fd00:2::", "len": 64}},
    }
    assert statement(v6, "tproxy") == {"family": "ip6", "port": 15001}


def test_plan_ip_rules_and_routes_for_each_family() -> None:
    p = plan(make(mark=0x20, table=1234, rule_priority=900))
    assert p.ip_rules == (IpRule(4, 0x20, 1234, 900), IpRule(6, 0x20, 1234, 900))
    assert p.routes == (LocalRoute(4, 1234), LocalRoute(6, 1234))
    assert str(p.ip_rules[1]) == "ip -6 rule fwmark 0x20 lookup 1234 priority 900"
    assert str(p.routes[0]) == "ip -4 route local default dev lo table 1234"


def test_plan_families_follow_intercepts_and_transparent_upstream() -> None:
    only4 = [{"listener": "tp4", "destination": ["198.18.2.0/24"]}]
    assert plan(make(only4, upstream_source="gateway")).versions == (4,)
    cfg = make(only4, upstream_source="client")
    assert plan(cfg).versions == (4,)
    raw = dict(cfg.raw)
    raw["cluster"] = {"a": {"endpoints": ["[fd00:1::2]:80"], "upstream_source": "client"}}
    assert plan(config_mod.from_dict(raw, "gw.toml", {})).versions == (4, 6)
    # Nothing says which: both.
    assert plan(make([], upstream_source="gateway")).versions == (4, 6)


def test_plan_specific_listener_address_is_the_tproxy_target() -> None:
    listeners = [{"name": "tp4", "bind": "127.0.0.1:15001", "transparent": True}]
    cfg = make([{"listener": "tp4", "destination": ["10.0.0.0/8"]}], listeners=listeners)
    assert statement(plan(cfg).rules[1].expr, "tproxy") == {
        "family": "ip",
        "addr": "127.0.0.1",
        "port": 15001,
    }


def test_plan_collapses_overlaps_and_sorts_sets() -> None:
    cfg = make(
        [
            {
                "listener": "tp4",
                "destination": ["198.18.2.0/24", "198.18.2.10/32", "198.18.3.0/24", "10.1.1.1"],
                "ports": [443, 80, 443],
                "interfaces": ["eth1", "eth0"],
            }
        ]
    )
    m = matches(plan(cfg).rules[1].expr)
    assert m["daddr"] == {"set": ["10.1.1.1", {"prefix": {"addr": "198.18.2.0", "len": 23}}]}
    assert m["dport"] == {"set": [80, 443]}
    assert m["iifname"] == {"set": ["eth0", "eth1"]}


def test_plan_udp_intercept() -> None:
    listeners = [
        {"name": "tp4", "bind": "0.0.0.0:15001", "transparent": True},
        {"name": "dns", "bind": "0.0.0.0:15053", "transparent": True, "protocol": "udp"},
    ]
    cfg = make(
        [{"listener": "dns", "destination": ["198.18.2.0/24"], "ports": [53], "protocol": "udp"}],
        listeners=listeners,
    )
    p = plan(cfg)
    assert matches(p.rules[0].expr)["l4proto"] == {"set": ["tcp", "udp"]}
    assert matches(p.rules[1].expr)["l4proto"] == "udp"
    assert statement(p.rules[2].expr, "reject") is None  # ICMP port unreachable


def test_comments_are_stable_and_follow_the_expression() -> None:
    a, b = plan(make()), plan(make())
    assert [r.comment for r in a.rules] == [r.comment for r in b.rules]
    assert all(r.comment.startswith("l4gw ") and len(r.comment) < 128 for r in a.rules)
    other = plan(make([{"listener": "tp4", "destination": ["198.18.2.0/24"], "ports": [81]}]))
    assert a.rules[1].comment != other.rules[1].comment
    assert a.rules[1].label == other.rules[1].label


def test_nft_transaction_replaces_the_table() -> None:
    p = plan(make())
    commands = p.nft_setup()
    table = {"family": "inet", "name": "l4gw"}
    assert commands[:3] == [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
    ]
    chain = commands[3]["add"]["chain"]
    assert (chain["hook"], chain["prio"], chain["type"]) == ("prerouting", CHAIN_PRIORITY, "filter")
    rules = [c["add"]["rule"] for c in commands[4:]]
    assert [r["comment"] for r in rules] == [r.comment for r in p.rules]
    json.dumps(commands)  # serialisable as is
    assert nft_teardown() == [{"add": {"table": table}}, {"delete": {"table": table}}]


def test_plan_without_tproxy_section() -> None:
    raw = dict(make().raw)
    del raw["tproxy"]
    with pytest.raises(TproxyError, match="no \\[tproxy\\] section"):
        plan(config_mod.from_dict(raw, "gw.toml", {}))


def test_config_rejects_a_family_the_listener_cannot_take() -> None:
    with pytest.raises(ConfigError) as info:
        make([{"listener": "tp4", "destination": ["198.18.2.0/24", "fd00:2::/64"]}])
    assert any(
        p.startswith("tproxy.intercept[0].destination: fd00:2::/64 cannot reach the IPv4")
        for p in info.value.problems
    )


def test_config_rejects_a_non_transparent_listener() -> None:
    listeners = [{"name": "tp4", "bind": "0.0.0.0:15001"}]
    with pytest.raises(ConfigError, match="needs transparent = true"):
        make([{"listener": "tp4", "destination": ["198.18.2.0/24"]}], listeners=listeners)


# --- state --------------------------------------------------------------------------------


def installed(cfg: Config, **changes: Any) -> State:
    p = plan(cfg)
    values: dict[str, Any] = {
        "table": True,
        "chains": (ChainState("prerouting", "filter", "prerouting", CHAIN_PRIORITY, "accept"),),
        "rule_comments": tuple(r.comment for r in p.rules),
        "ip_rules": p.ip_rules,
        "routes": p.routes,
    }
    values.update(changes)
    return State(**values)


def test_differences_empty_when_installed() -> None:
    cfg = make()
    assert differences(plan(cfg), installed(cfg)) == []


def test_differences_name_what_is_missing_or_stale() -> None:
    cfg = make()
    p = plan(cfg)
    assert differences(p, installed(cfg, table=False, chains=(), rule_comments=())) == [
        "nftables table inet l4gw is missing"
    ]
    diffs = differences(p, installed(cfg, ip_rules=p.ip_rules[:1]))
    assert diffs == ["missing: ip -6 rule fwmark 0x1 lookup 100 priority 10000"]
    stale = LocalRoute(4, 77)
    diffs = differences(p, installed(cfg, routes=(*p.routes, stale)))
    assert diffs == ["not in the config: ip -4 route local default dev lo table 77"]
    comments = tuple(r.comment for r in p.rules)
    diffs = differences(p, installed(cfg, rule_comments=comments[1:]))
    assert len(diffs) == 1 and "missing" in diffs[0] and "transparent sockets" in diffs[0]
    diffs = differences(p, installed(cfg, rule_comments=tuple(reversed(comments))))
    assert diffs == ["nftables table inet l4gw: rules differ from the config (order)"]


def test_conflicts() -> None:
    cfg = make()
    p = plan(cfg)
    assert conflicts(p, installed(cfg)) == []
    same_priority = ForeignRule(4, 10000, None, 200, "10000: lookup 200")
    earlier_mark = ForeignRule(6, 50, 1, 300, "50: fwmark 0x1 lookup 300")
    later_mark = ForeignRule(6, 20000, 1, 300, "20000: fwmark 0x1 lookup 300")
    found = conflicts(p, installed(cfg, foreign_rules=(same_priority, earlier_mark, later_mark)))
    assert len(found) == 2
    assert "priority 10000 is also used" in found[0][0] and "rule_priority" in found[0][1]
    assert "sees fwmark 0x1 before ours" in found[1][0] and "mark" in found[1][1]
    found = conflicts(p, installed(cfg, foreign_routes={100: ("unicast default dev eth0",)}))
    assert found and "routing table 100 also holds routes" in found[0][0]
    found = conflicts(p, installed(cfg, other_tables=("ip mangle",)))
    assert found and found[0][1].startswith("nft delete table ip mangle")


# --- doctor -------------------------------------------------------------------------------

GOOD_SYSCTL = {
    "ipv4/ip_forward": 1,
    "ipv6/conf/all/forwarding": 1,
    "ipv4/conf/all/rp_filter": 0,
    "ipv4/conf/eth0/rp_filter": 2,
    "ipv4/conf/eth1/rp_filter": 0,
}


def good_facts(cfg: Config, **changes: Any) -> Facts:
    values: dict[str, Any] = {
        "cap_net_admin": True,
        "state": installed(cfg),
        "interfaces": frozenset({"lo", "eth0", "eth1"}),
        "sysctl": GOOD_SYSCTL,
        "egress": {"198.18.1.2:80": "eth1"},
        "listening": {
            "tp4": (ListeningSocket("0.0.0.0", 15001, True),),
            "tp6": (ListeningSocket("::", 15001, True),),
        },
    }
    values.update(changes)
    return Facts(**values)


def levels(findings: list[Any], level: str) -> list[str]:
    return [f.text for f in findings if f.level == level]


def test_doctor_clean_on_a_good_setup() -> None:
    cfg = make()
    findings = diagnose(cfg, plan(cfg), good_facts(cfg))
    assert levels(findings, FAIL) == [] and levels(findings, WARN) == []
    oks = " | ".join(levels(findings, OK))
    expected_oks = ("CAP_NET_ADMIN", "IPv4 fwmark rule", "IPv6 local route", "rp_filter on eth1")
    for expected in (*expected_oks, "IPv4 forwarding", "listener tp6"):
        assert expected in oks


@pytest.mark.parametrize(
    "change,expected,fix",
    [
        ({"cap_net_admin": False}, "CAP_NET_ADMIN: missing", "AmbientCapabilities"),
        ({"state": None, "state_error": "Operation not permitted"}, "cannot read", "root"),
        (
            # The kernel takes max(all, interface): eth0 (2) stays loose, eth1 (0) turns strict.
            {"sysctl": {**GOOD_SYSCTL, "ipv4/conf/all/rp_filter": 1}},
            "rp_filter=1 (strict) on eth1",
            "sysctl -w net.ipv4.conf.all.rp_filter=2",
        ),
        (
            {"sysctl": {**GOOD_SYSCTL, "ipv4/conf/eth1/rp_filter": 1}},
            "rp_filter=1 (strict) on eth1",
            "sysctl -w net.ipv4.conf.eth1.rp_filter=2",
        ),
        (
            {"sysctl": {**GOOD_SYSCTL, "ipv4/conf/all/src_valid_mark": 1}},
            "src_valid_mark=1 on eth0",
            "net.ipv4.conf.all.src_valid_mark=0",
        ),
        (
            {"sysctl": {**GOOD_SYSCTL, "ipv4/ip_forward": 0}},
            "IPv4 forwarding is off",
            "sysctl -w net.ipv4.ip_forward=1",
        ),
        ({"interfaces": frozenset({"lo", "eth1"})}, "no interface eth0 here", "interfaces"),
        (
            {"listening": {"tp4": (ListeningSocket("0.0.0.0", 15001, False),)}},
            "tp4 (0.0.0.0:15001): the socket listening there is not transparent",
            "transparent = true",
        ),
    ],
)
def test_doctor_reports_each_problem_with_a_fix(
    change: dict[str, Any], expected: str, fix: str
) -> None:
    cfg = make()
    findings = diagnose(cfg, plan(cfg), good_facts(cfg, **change))
    failed = [f for f in findings if f.level == FAIL]
    assert any(expected in f.text for f in failed), failed
    assert all(f.fix for f in failed)
    assert any(fix in f.fix for f in failed if expected in f.text)


def test_doctor_reports_missing_rules_and_routes_per_family() -> None:
    cfg = make()
    p = plan(cfg)
    state = installed(cfg, ip_rules=p.ip_rules[1:], routes=p.routes[:1], table=False)
    failed = levels(diagnose(cfg, p, good_facts(cfg, state=state)), FAIL)
    assert any(t.startswith("nftables table inet l4gw: missing") for t in failed)
    assert any(t.startswith("IPv4 fwmark rule missing") for t in failed)
    assert any(t.startswith("IPv6 local route missing") for t in failed)
    assert not any(t.startswith(("IPv6 fwmark", "IPv4 local")) for t in failed)


def test_doctor_conflicts_fail() -> None:
    cfg = make()
    state = installed(cfg, other_tables=("ip mangle",))
    failed = levels(diagnose(cfg, plan(cfg), good_facts(cfg, state=state)), FAIL)
    assert failed and failed[0].startswith("conflict: nftables table ip mangle")


def test_doctor_accept_local_cancels_src_valid_mark() -> None:
    cfg = make()
    sysctl = {**GOOD_SYSCTL, "ipv4/conf/all/src_valid_mark": 1, "ipv4/conf/all/accept_local": 1}
    assert levels(diagnose(cfg, plan(cfg), good_facts(cfg, sysctl=sysctl)), FAIL) == []


def test_doctor_forwarding_only_checked_for_transparent_upstream() -> None:
    cfg = make(upstream_source="gateway")
    facts = good_facts(cfg, sysctl={**GOOD_SYSCTL, "ipv4/ip_forward": 0}, egress={})
    findings = diagnose(cfg, plan(cfg), facts)
    assert not any("forwarding" in f.text for f in findings)


def test_doctor_nothing_listening_is_a_warning() -> None:
    cfg = make()
    findings = diagnose(cfg, plan(cfg), good_facts(cfg, listening={}))
    assert levels(findings, FAIL) == []
    assert len(levels(findings, WARN)) == 2


def test_cap_net_admin_from_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert has_cap_net_admin(str(status))
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_cap_net_admin(str(status))
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_cap_net_admin(str(status))


LEGACY_SAVE = """# Generated by iptables-save v1.8.9
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 15999 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
-A PREROUTING -p tcp -m tcp --dport 81 -j MARK --set-xmark 0x5/0xffffffff
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""


def test_doctor_reads_iptables_legacy_rules() -> None:
    """x_tables rules run beside nftables and nft cannot list them: TPROXY there is a
    conflict, marks a warning, each with the delete command; other rules are fine."""
    cfg = make()
    findings = diagnose(cfg, plan(cfg), good_facts(cfg, legacy={4: LEGACY_SAVE}))
    (failed,) = [f for f in findings if f.level == FAIL]
    assert failed.text.startswith("conflict: IPv4 iptables-legacy mangle rule does TPROXY too")
    assert failed.fix.startswith(
        "iptables-legacy -t mangle -D PREROUTING -p tcp -m tcp --dport 80 -j TPROXY"
    )
    (warned,) = levels(findings, WARN)
    assert "mangle rule sets packet marks" in warned and "--dport 81" in warned

    quiet = "*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    findings = diagnose(cfg, plan(cfg), good_facts(cfg, legacy={6: quiet}))
    assert levels(findings, FAIL) == [] and levels(findings, WARN) == []
    assert "IPv6 iptables-legacy: 1 rules; none marks, diverts or does TPROXY" in levels(
        findings, OK
    )

    many = "*nat\n" + "".join(
        f"-A PREROUTING -p tcp -m tcp --dport {p} -j REDIRECT --to-ports 9\n" for p in range(5)
    )
    warned = levels(diagnose(cfg, plan(cfg), good_facts(cfg, legacy={4: many})), WARN)
    assert len(warned) == 4 and warned[-1] == "IPv4 iptables-legacy: 2 more divert rules"

    unread = diagnose(cfg, plan(cfg), good_facts(cfg, legacy={4: None}))
    assert any("could not be read" in t for t in levels(unread, WARN))
