"""The TPROXY plan: what ``[tproxy]`` asks of nftables and policy routing, as plain values.

:func:`plan` is a pure function of the config: the rules of the nftables table
``inet l4gw``, the fwmark ip rules and the local routes. :class:`State` is what
the kernel holds (read by :mod:`gateway.tproxy.state`), and :func:`differences`
and :func:`conflicts` compare the two. No I/O and no trio here: reading the
kernel and changing it is :mod:`gateway.tproxy.state`.

Rules kept here:

1. **Ours is tagged.** Every ip rule and route of the plan carries the routing
   protocol :data:`RTPROT_L4GW`; every nftables rule carries a comment naming what
   it is for, with a digest of its expression (:attr:`NftRule.comment`): equal
   comments, equal rules. That is what lets teardown clean up without memory.
2. **Fail closed.** Each TPROXY rule is followed by a reject rule with the same
   match: when no transparent socket listens (the gateway is down), intercepted
   connections are reset instead of being routed to their original
   destination, since the gateway is never an open relay.
3. **Never take over what is not ours.** A route in our table or a rule at our
   priority that we did not make is a conflict (:func:`conflicts`), with the fix.

Routing, per family (kernel Documentation/networking/tproxy.rst): packets the
``tproxy`` statement assigned to a socket, and packets of transparent sockets
(``socket transparent 1``: established intercepted flows, and the backends'
replies to connections made from the client's address), get ``meta mark``;
``ip rule fwmark MARK lookup TABLE`` sends them to a table whose
``local default dev lo`` route delivers them locally.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.config import Config, ListenerConfig
from gateway.schema import IPNetwork

TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "l4gw"
CHAIN: Final = "prerouting"
# The mangle priority (-150): after conntrack (-200), before anything routes the packet.
CHAIN_PRIORITY: Final = -150
RTPROT_L4GW: Final = 244
"""Routing protocol id tagging our ip rules and routes (``ip rule ... proto 244``).

Unassigned in iproute2's rt_protos; ``ip rule show proto 244`` lists what l4gw made."""
COMMENT_PREFIX: Final = "l4gw "
TABLE_REF: Final = {"family": TABLE_FAMILY, "name": TABLE_NAME}
"""Our table in libnftables JSON commands."""


class TproxyError(Exception):
    """Setup or teardown could not be done; ``str()`` says what and why."""


# --- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NftRule:
    """One rule of our chain."""

    label: str
    """What the rule is for, e.g. "intercept[0] tp4 ipv4"."""
    expr: tuple[Any, ...] = field(compare=False)
    """The rule's statements in libnftables JSON."""

    @property
    def comment(self) -> str:
        """The label and a digest of the expression: equal comments, equal rules."""
        digest = hashlib.sha256(json.dumps(self.expr, sort_keys=True).encode()).hexdigest()
        return f"{COMMENT_PREFIX}{self.label} #{digest[:12]}"


@dataclass(frozen=True, slots=True)
class IpRule:
    """``ip rule add fwmark MARK lookup TABLE priority PRIORITY proto 244``."""

    version: int
    mark: int
    table: int
    priority: int
    mask: int = 0xFFFFFFFF

    def __str__(self) -> str:
        mask = "" if self.mask == 0xFFFFFFFF else f"/{self.mask:#x}"
        return (
            f"ip -{self.version} rule fwmark {self.mark:#x}{mask} lookup {self.table} "
            f"priority {self.priority}"
        )


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """``ip route add local default dev lo table TABLE proto 244``."""

    version: int
    table: int
    dst: str = "default"
    kind: str = "local"
    dev: str = "lo"

    def __str__(self) -> str:
        return f"ip -{self.version} route {self.kind} {self.dst} dev {self.dev} table {self.table}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything ``[tproxy]`` asks for."""

    rules: tuple[NftRule, ...]
    ip_rules: tuple[IpRule, ...]
    routes: tuple[LocalRoute, ...]

    def nft_setup(self) -> list[dict[str, Any]]:
        """The one transaction that replaces our table with the planned one."""
        chain = {
            **_chain_ref(),
            "type": "filter",
            "hook": "prerouting",
            "prio": CHAIN_PRIORITY,
            "policy": "accept",
        }
        commands: list[dict[str, Any]] = [
            {"add": {"table": TABLE_REF}},
            {"delete": {"table": TABLE_REF}},
            {"add": {"table": TABLE_REF}},
            {"add": {"chain": chain}},
        ]
        for rule in self.rules:
            commands.append(
                {
                    "add": {
                        "rule": {
                            "family": TABLE_FAMILY,
                            "table": TABLE_NAME,
                            "chain": CHAIN,
                            "comment": rule.comment,
                            "expr": list(rule.expr),
                        }
                    }
                }
            )
        return commands

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(r.version for r in self.ip_rules)


def _chain_ref() -> dict[str, Any]:
    return {"family": TABLE_FAMILY, "table": TABLE_NAME, "name": CHAIN}


def nft_teardown() -> list[dict[str, Any]]:
    """The one transaction that removes our table (a no-op when it is absent)."""
    return [{"add": {"table": TABLE_REF}}, {"delete": {"table": TABLE_REF}}]


def plan(config: Config) -> Plan:
    """What ``config``'s ``[tproxy]`` section asks for.

    Per ``[[tproxy.intercept]]`` and address family: a ``tproxy`` rule to the
    listener's port (and address, unless it is a wildcard) that marks, and a
    reject rule with the same match. Before them, the ``socket transparent 1``
    rule. An ip rule and a local route for each family that any intercepted
    destination or any transparent-upstream endpoint uses (both when none does).

    Raises:
        TproxyError: no ``[tproxy]`` section, or an intercept whose listener cannot
            take it (the config loader reports these too).
    """
    tc = config.tproxy
    if tc is None:
        raise TproxyError(f"{config.path}: no [tproxy] section")
    listeners = {li.name: li for li in config.listeners}
    problems: list[str] = []
    versions: set[int] = set()
    intercept_rules: list[NftRule] = []
    protocols = {"tcp"}
    for i, ic in enumerate(tc.intercept):
        where = f"tproxy.intercept[{i}]"
        lc = listeners.get(ic.listener)
        if lc is None or not lc.transparent or not lc.port:
            problems.append(f'{where}.listener: "{ic.listener}" is not a transparent listener')
            continue
        protocols.add(ic.protocol)
        for version in (4, 6):
            nets = [n for n in ic.destination if n.version == version]
            if not nets:
                continue
            if _version(lc) != version:
                problems.append(f"{where}: IPv{version} destinations, IPv{_version(lc)} listener")
                continue
            versions.add(version)
            match = _match(ic.protocol, version, nets, ic.interfaces, ic.ports)
            label = f"intercept[{i}] {ic.listener} ipv{version}"
            intercept_rules.append(
                NftRule(f"{label} tproxy", (*match, _tproxy(lc, version), *_mark(tc.mark)))
            )
            intercept_rules.append(NftRule(f"{label} fail-closed", (*match, _reject(ic.protocol))))
    if problems:
        raise TproxyError("; ".join(problems))
    for cluster in config.clusters.values():
        if cluster.upstream_source == "client":
            versions.update(6 if ":" in e.host else 4 for e in cluster.endpoints)
    proto_value: Any = "tcp" if protocols == {"tcp"} else {"set": sorted(protocols)}
    transparent = NftRule(
        "transparent sockets",
        (
            _eq({"meta": {"key": "l4proto"}}, proto_value),
            _eq({"socket": {"key": "transparent"}}, 1),
            *_mark(tc.mark),
        ),
    )
    chosen = sorted(versions) or [4, 6]
    return Plan(
        rules=(transparent, *intercept_rules),
        ip_rules=tuple(IpRule(v, tc.mark, tc.table, tc.rule_priority) for v in chosen),
        routes=tuple(LocalRoute(v, tc.table) for v in chosen),
    )


def _version(lc: ListenerConfig) -> int:
    return 6 if lc.family == socket.AF_INET6 else 4


def _eq(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _one_or_set(values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else {"set": list(values)}


def _match(
    protocol: str,
    version: int,
    nets: Sequence[IPNetwork],
    interfaces: Sequence[str],
    ports: Sequence[int],
) -> tuple[dict[str, Any], ...]:
    # Overlapping prefixes in one anonymous interval set are an nft error: collapse.
    collapsed: list[Any] = []
    for net in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
        if net.prefixlen == net.max_prefixlen:
            collapsed.append(str(net.network_address))
        else:
            collapsed.append({"prefix": {"addr": str(net.network_address), "len": net.prefixlen}})
    exprs = [_eq({"meta": {"key": "l4proto"}}, protocol)]
    if interfaces:
        exprs.append(_eq({"meta": {"key": "iifname"}}, _one_or_set(sorted(set(interfaces)))))
    ip = "ip" if version == 4 else "ip6"
    exprs.append(_eq({"payload": {"protocol": ip, "field": "daddr"}}, _one_or_set(collapsed)))
    if ports:
        exprs.append(
            _eq(
                {"payload": {"protocol": protocol, "field": "dport"}},
                _one_or_set(sorted(set(ports))),
            )
        )
    return tuple(exprs)


def _tproxy(lc: ListenerConfig, version: int) -> dict[str, Any]:
    target: dict[str, Any] = {"family": "ip" if version == 4 else "ip6", "port": lc.port}
    if not ipaddress.ip_address(lc.host).is_unspecified:
        target["addr"] = lc.host
    return {"tproxy": target}


def _mark(mark: int) -> tuple[dict[str, Any], ...]:
    return ({"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}, {"accept": None})


def _reject(protocol: str) -> dict[str, Any]:
    # A reset tells a TCP client at once; ICMP port unreachable is UDP's equivalent.
    return {"reject": {"type": "tcp reset"} if protocol == "tcp" else None}


# --- what is installed, compared with the plan ----------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainState:
    name: str
    type: str | None
    hook: str | None
    prio: int | None
    policy: str | None


@dataclass(frozen=True, slots=True)
class ForeignRule:
    """An ip rule l4gw did not make."""

    version: int
    priority: int
    fwmark: int | None
    table: int
    text: str


@dataclass(frozen=True, slots=True)
class State:
    """What the kernel holds that concerns us (read by :func:`read_state`)."""

    table: bool
    """``inet l4gw`` exists."""
    chains: tuple[ChainState, ...]
    rule_comments: tuple[str, ...]
    """Comments of the rules in our table, chain by chain, in order."""
    ip_rules: tuple[IpRule, ...]
    """ip rules tagged proto 244."""
    routes: tuple[LocalRoute, ...]
    """Routes tagged proto 244 (any table)."""
    foreign_rules: tuple[ForeignRule, ...] = ()
    foreign_routes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Routes not ours, by table, for the tables our routes and the plan use."""
    other_tables: tuple[str, ...] = ()
    """Other nftables tables ("family name") that hold TPROXY rules or are named l4gw."""


def differences(p: Plan, state: State) -> list[str]:
    """How ``state`` differs from ``p``; empty when setup is complete and current."""
    diffs: list[str] = []
    if not state.table:
        diffs.append(f"nftables table {TABLE_FAMILY} {TABLE_NAME} is missing")
    else:
        want_chain = ChainState(CHAIN, "filter", "prerouting", CHAIN_PRIORITY, "accept")
        if state.chains != (want_chain,):
            diffs.append(
                f"nftables table {TABLE_FAMILY} {TABLE_NAME}: chains differ from the config"
            )
        want = tuple(r.comment for r in p.rules)
        if state.rule_comments != want:
            missing = [c for c in want if c not in state.rule_comments]
            extra = [c for c in state.rule_comments if c not in want]
            detail = "; ".join(
                [f'missing "{c}"' for c in missing] + [f'not in the config "{c}"' for c in extra]
            )
            diffs.append(
                f"nftables table {TABLE_FAMILY} {TABLE_NAME}: rules differ from the config"
                + (f" ({detail})" if detail else " (order)")
            )
    for rule in p.ip_rules:
        if rule not in state.ip_rules:
            diffs.append(f"missing: {rule}")
    for rule in state.ip_rules:
        if rule not in p.ip_rules:
            diffs.append(f"not in the config: {rule}")
    for route in p.routes:
        if route not in state.routes:
            diffs.append(f"missing: {route}")
    for route in state.routes:
        if route not in p.routes:
            diffs.append(f"not in the config: {route}")
    return diffs


def conflicts(p: Plan, state: State) -> list[tuple[str, str]]:
    """What others hold that would fight with ``p`` (pure): (problem, fix) pairs."""
    found: list[tuple[str, str]] = []
    for rule in p.ip_rules:
        for other in state.foreign_rules:
            if other.version != rule.version:
                continue
            if other.priority == rule.priority:
                found.append(
                    (
                        f"IPv{rule.version} ip rule priority {rule.priority} is also used by "
                        f'"{other.text}"',
                        "set [tproxy] rule_priority to a free priority",
                    )
                )
            elif other.fwmark == rule.mark and other.priority < rule.priority:
                found.append(
                    (
                        f'IPv{rule.version} ip rule "{other.text}" sees fwmark {rule.mark:#x} '
                        "before ours",
                        "set [tproxy] mark to an unused value",
                    )
                )
    for table in sorted({r.table for r in p.routes}):
        routes = state.foreign_routes.get(table, ())
        if routes:
            more = ", ..." if len(routes) > 1 else ""
            found.append(
                (
                    f"routing table {table} also holds routes l4gw did not make "
                    f"({routes[0]}{more})",
                    "set [tproxy] table to an unused id",
                )
            )
    for name in state.other_tables:
        found.append(
            (
                f"nftables table {name} also does TPROXY or is named {TABLE_NAME}",
                f"nft delete table {name}  (or stop intercepting the same traffic twice)",
            )
        )
    return found


def summary(p: Plan) -> str:
    versions = "+".join(f"IPv{v}" for v in p.versions)
    return (
        f"table {TABLE_FAMILY} {TABLE_NAME} with {len(p.rules)} rules; "
        f"fwmark rule and local route for {versions}"
    )
