"""TPROXY plumbing: the nftables table, the fwmark ip rule and the local route.

What ``[tproxy]`` asks for is computed by :func:`plan` (a pure function of the
config), read back from the kernel by :func:`read_state`, compared by
:func:`differences` (pure), and made true by :func:`apply` or undone by
:func:`teardown`.

Rules kept:

1. **One table, replaced atomically.** Everything in nftables lives in the
   table ``inet l4gw``; :func:`apply` sends "add, delete, add the table, then its
   chain and rules" as one libnftables batch, so the kernel swaps the old table
   for the new one in a single transaction and a failed setup changes nothing.
2. **Ours is tagged, so teardown needs no memory.** Every ip rule and route we
   add carries the routing protocol :data:`RTPROT_L4GW`; every nftables rule
   carries a comment naming what it is for, with a digest of its expression.
   :func:`teardown` removes the table and whatever carries the tag, so it cleans
   up after a gateway killed with SIGKILL, whatever config that one ran.
3. **Idempotent.** :func:`apply` converges: stale tagged rules and routes are
   removed, missing ones added, present ones left alone; applying twice leaves
   the same state.
4. **Fail closed.** Each TPROXY rule is followed by a reject rule with the same
   match: when no transparent socket listens (the gateway is down), intercepted
   connections are reset instead of being routed to their original
   destination, since the gateway is never an open relay.
5. **Routing before interception.** :func:`apply` installs the route, then the
   rule, then the nftables table; :func:`teardown` removes them in reverse, so
   no marked packet ever finds half a setup.
6. **Never take over what is not ours.** A route in our table or a rule at our
   priority that we did not make is a conflict: :func:`apply` refuses and says
   which.
7. **One owner, and only the owner changes it.** The state is one per network
   namespace, so a managing gateway first takes that namespace's ownership
   lock (:mod:`gateway.tproxy.owner`); a second start finds it held and
   touches nothing. The owner's guard (:mod:`gateway.tproxy.guard`) restores
   what someone else removed or changed.

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
import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.config import Config, ListenerConfig
from gateway.linux import FR_ACT_TO_TBL, RT_SCOPE_HOST, RTN_LOCAL
from gateway.schema import IPNetwork
from gateway.tproxy import owner as tproxy_owner
from gateway.tproxy import rtdump
from gateway.tproxy.nftables import Nftables, NftablesError

log = logging.getLogger("l4gw.tproxy")

TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "l4gw"
CHAIN: Final = "prerouting"
# The mangle priority (-150): after conntrack (-200), before anything routes the packet.
CHAIN_PRIORITY: Final = -150
RTPROT_L4GW: Final = 244
"""Routing protocol id tagging our ip rules and routes (``ip rule ... proto 244``).

Unassigned in iproute2's rt_protos; ``ip rule show proto 244`` lists what l4gw made."""
COMMENT_PREFIX: Final = "l4gw "
_FAMILIES: Final = {4: socket.AF_INET, 6: socket.AF_INET6}
_TABLE_REF: Final = {"family": TABLE_FAMILY, "name": TABLE_NAME}


class TproxyError(Exception):
    """Setup or teardown could not be done; ``str()`` says what and why."""


# --- the plan (pure) ------------------------------------------------------------------------


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
            {"add": {"table": _TABLE_REF}},
            {"delete": {"table": _TABLE_REF}},
            {"add": {"table": _TABLE_REF}},
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
    return [{"add": {"table": _TABLE_REF}}, {"delete": {"table": _TABLE_REF}}]


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


# --- what is installed ----------------------------------------------------------------------


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


def read_state(nft: Nftables, ipr: Any, tables: Sequence[int] = ()) -> State:
    """Read our table, our tagged rules and routes, and what may conflict with them.

    Args:
        nft: a libnftables context in the namespace to read.
        ipr: a pyroute2 ``IPRoute`` in the same namespace.
        tables: routing tables whose other (foreign) routes to report.

    Raises:
        NftablesError, pyroute2 NetlinkError: e.g. without CAP_NET_ADMIN.
    """
    table, chains, comments, tproxy_tables = _nft_state(nft.ruleset())
    ours_rules, foreign_rules = _ip_rules(ipr)
    ours_routes: list[LocalRoute] = []
    foreign: dict[int, list[str]] = {}
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    for version, family in _FAMILIES.items():
        for msg in ipr.get_routes(family=family):
            route_table = msg.get_attr("RTA_TABLE") or msg["table"]
            dst = msg.get_attr("RTA_DST")
            dst_text = f"{dst}/{msg['dst_len']}" if dst else "default"
            dev = names.get(msg.get_attr("RTA_OIF"), "?")
            kind = _ROUTE_TYPES.get(msg["type"], str(msg["type"]))
            if msg["proto"] == RTPROT_L4GW:
                ours_routes.append(LocalRoute(version, route_table, dst_text, kind, dev))
            elif route_table in tables:
                foreign.setdefault(route_table, []).append(
                    f"{kind} {dst_text} dev {dev} table {route_table}"
                )
    return State(
        table=table,
        chains=chains,
        rule_comments=comments,
        ip_rules=ours_rules,
        routes=tuple(ours_routes),
        foreign_rules=foreign_rules,
        foreign_routes={k: tuple(v) for k, v in foreign.items()},
        other_tables=tproxy_tables,
    )


def read_own(p: Plan) -> State:
    """Our table, our tagged ip rules, and our routes in the tables ``p`` uses.

    What the guard compares with ``p`` every few seconds, at a cost that does not
    grow with the host's ruleset or routing table: it lists our table alone and
    dumps only our routes (:mod:`gateway.tproxy.rtdump`). It does not look for conflicts
    (:func:`apply` does, before it changes anything) nor for our routes in other
    tables (stale ones there route no marked packet).

    Raises:
        TproxyError: the state cannot be read (e.g. no CAP_NET_ADMIN).
    """
    try:
        with Nftables() as nft, _iproute() as ipr:
            table, chains, comments, _ = _nft_state(_own_table(nft))
            ours_rules, _ = _ip_rules(ipr)
            routes: list[LocalRoute] = []
            for version, route_table in sorted({(r.version, r.table) for r in p.routes}):
                try:
                    found = rtdump.routes(_FAMILIES[version], route_table, RTPROT_L4GW)
                except rtdump.Unsupported:
                    return read_state(nft, ipr)  # a kernel before 4.20: the full dump
                for r in found:
                    dst = f"{r.dst}/{r.dst_len}" if r.dst else "default"
                    dev = _ifname(r.oif)
                    kind = _ROUTE_TYPES.get(r.type, str(r.type))
                    routes.append(LocalRoute(version, r.table, dst, kind, dev))
    except Exception as exc:
        raise _describe(exc, "reading the installed state") from exc
    return State(table, chains, comments, ours_rules, tuple(routes))


def _own_table(nft: Nftables) -> list[dict[str, Any]]:
    """``list table inet l4gw``; empty when there is no such table."""
    try:
        return nft.run([{"list": {"table": _TABLE_REF}}])
    except NftablesError:
        listed = nft.run([{"list": {"tables": None}}])
        if _nft_state(listed)[0]:
            raise  # the table exists: the error was something else
        return []


def _ifname(index: int | None) -> str:
    if index is None:
        return "?"
    try:
        return socket.if_indextoname(index)
    except OSError:
        return "?"


def _nft_state(
    items: Sequence[dict[str, Any]],
) -> tuple[bool, tuple[ChainState, ...], tuple[str, ...], tuple[str, ...]]:
    """(our table exists, its chains, its rules' comments, other TPROXY tables)."""
    table = False
    chains: list[ChainState] = []
    comments: list[str] = []
    tproxy_tables: set[str] = set()
    for item in items:
        if "table" in item:
            t = item["table"]
            if t["name"] == TABLE_NAME and t["family"] == TABLE_FAMILY:
                table = True
            elif t["name"] == TABLE_NAME:
                tproxy_tables.add(f"{t['family']} {t['name']}")
        elif "chain" in item:
            c = item["chain"]
            if (c["family"], c["table"]) == (TABLE_FAMILY, TABLE_NAME):
                chains.append(
                    ChainState(
                        c["name"], c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")
                    )
                )
        elif "rule" in item:
            r = item["rule"]
            if (r["family"], r["table"]) == (TABLE_FAMILY, TABLE_NAME):
                comments.append(r.get("comment", ""))
            elif any("tproxy" in stmt for stmt in r.get("expr", ())):
                tproxy_tables.add(f"{r['family']} {r['table']}")
    return table, tuple(chains), tuple(comments), tuple(sorted(tproxy_tables))


def _ip_rules(ipr: Any) -> tuple[tuple[IpRule, ...], tuple[ForeignRule, ...]]:
    """(ip rules tagged as ours, every other ip rule)."""
    ours_rules: list[IpRule] = []
    foreign_rules: list[ForeignRule] = []
    for version, family in _FAMILIES.items():
        for msg in ipr.get_rules(family=family):
            priority = msg.get_attr("FRA_PRIORITY") or 0
            rule_table = msg.get_attr("FRA_TABLE") or msg["table"]
            fwmark = msg.get_attr("FRA_FWMARK")
            if msg.get_attr("FRA_PROTOCOL") == RTPROT_L4GW:
                mask = msg.get_attr("FRA_FWMASK")
                ours_rules.append(
                    IpRule(
                        version,
                        fwmark or 0,
                        rule_table,
                        priority,
                        0xFFFFFFFF if mask is None else mask,
                    )
                )
            else:
                text = (
                    f"{priority}: "
                    + (f"fwmark {fwmark:#x} " if fwmark is not None else "")
                    + f"lookup {rule_table}"
                )
                foreign_rules.append(ForeignRule(version, priority, fwmark, rule_table, text))
    return tuple(ours_rules), tuple(foreign_rules)


# linux/rtnetlink.h: RTN_UNICAST = 1, RTN_LOCAL = 2, RTN_BROADCAST = 3, ...
_ROUTE_TYPES: Final = {1: "unicast", RTN_LOCAL: "local", 3: "broadcast", 4: "anycast"}


# --- applying and removing ------------------------------------------------------------------


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _describe(exc: BaseException, what: str) -> TproxyError:
    text = str(exc)
    code = getattr(exc, "code", None)
    if code == 1 or "Operation not permitted" in text:
        text += " (needs CAP_NET_ADMIN: run as root or grant the capability)"
    return TproxyError(f"{what}: {text}")


def status(config: Config) -> tuple[Plan, State]:
    """The plan and the installed state, side by side.

    Raises:
        TproxyError: no ``[tproxy]`` section, or the state cannot be read.
    """
    p = plan(config)
    try:
        with Nftables() as nft, _iproute() as ipr:
            return p, read_state(nft, ipr, [r.table for r in p.routes])
    except Exception as exc:
        raise _describe(exc, "reading the installed state") from exc


def apply(config: Config) -> list[str]:
    """Make the installed state match ``config``'s ``[tproxy]`` (idempotent).

    Returns:
        What changed, one line each (empty when nothing did).

    Raises:
        TproxyError: a conflict (nothing was changed), or a kernel refusal.
    """
    p = plan(config)
    changes: list[str] = []
    try:
        with Nftables() as nft, _iproute() as ipr:
            state = read_state(nft, ipr, [r.table for r in p.routes])
            found = conflicts(p, state)
            if found:
                raise TproxyError("; ".join(f"{what} (fix: {fix})" for what, fix in found))
            lo = ipr.link_lookup(ifname="lo")[0]
            for route in state.routes:
                if route not in p.routes:
                    _del_route(ipr, route, lo)
                    changes.append(f"removed stale {route}")
            for route in p.routes:
                if route not in state.routes:
                    ipr.route(
                        "replace",
                        family=_FAMILIES[route.version],
                        dst="0.0.0.0/0" if route.version == 4 else "::/0",
                        type="local",
                        scope=RT_SCOPE_HOST if route.version == 4 else 0,
                        oif=lo,
                        table=route.table,
                        proto=RTPROT_L4GW,
                    )
                    changes.append(f"added {route}")
            for rule in state.ip_rules:
                if rule not in p.ip_rules:
                    _del_rule(ipr, rule)
                    changes.append(f"removed stale {rule}")
            for rule in p.ip_rules:
                if rule not in state.ip_rules:
                    ipr.rule(
                        "add",
                        family=_FAMILIES[rule.version],
                        fwmark=rule.mark,
                        fwmask=rule.mask,
                        table=rule.table,
                        priority=rule.priority,
                        action=FR_ACT_TO_TBL,
                        protocol=RTPROT_L4GW,
                    )
                    changes.append(f"added {rule}")
            if not state.table:
                changes.append(f"created nftables table {TABLE_FAMILY} {TABLE_NAME}")
            elif state.rule_comments != tuple(r.comment for r in p.rules):
                changes.append(f"replaced nftables table {TABLE_FAMILY} {TABLE_NAME}")
            # Always sent, also when it looks current: the swap is atomic and cheap, and
            # it repairs what comments cannot show (a rule edited in place by hand).
            nft.run(p.nft_setup())
    except TproxyError:
        raise
    except Exception as exc:
        raise _describe(exc, "setup") from exc
    return changes


def teardown() -> list[str]:
    """Remove our table and every ip rule and route tagged as ours, whatever config made them.

    Returns:
        What was removed, one line each (empty when nothing was installed).

    Raises:
        TproxyError: the kernel refused (e.g. no CAP_NET_ADMIN).
    """
    removed: list[str] = []
    try:
        with Nftables() as nft, _iproute() as ipr:
            state = read_state(nft, ipr)
            nft.run(nft_teardown())
            if state.table:
                removed.append(f"nftables table {TABLE_FAMILY} {TABLE_NAME}")
            for rule in state.ip_rules:
                _del_rule(ipr, rule)
                removed.append(str(rule))
            lo = ipr.link_lookup(ifname="lo")[0]
            for route in state.routes:
                _del_route(ipr, route, lo)
                removed.append(str(route))
    except Exception as exc:
        raise _describe(exc, "teardown") from exc
    return removed


def _del_rule(ipr: Any, rule: IpRule) -> None:
    ipr.rule(
        "del",
        family=_FAMILIES[rule.version],
        fwmark=rule.mark,
        fwmask=rule.mask,
        table=rule.table,
        priority=rule.priority,
        protocol=RTPROT_L4GW,
    )


def _del_route(ipr: Any, route: LocalRoute, lo: int) -> None:
    default = "0.0.0.0/0" if route.version == 4 else "::/0"
    dst = default if route.dst == "default" else route.dst
    ipr.route(
        "del",
        family=_FAMILIES[route.version],
        dst=dst,
        table=route.table,
        proto=RTPROT_L4GW,
        type=route.kind,
        # The kernel matches the scope on delete: an IPv4 local route has host scope.
        scope=RT_SCOPE_HOST if route.version == 4 and route.kind == "local" else 0,
    )


@contextmanager
def managed(config: Config) -> Iterator[None]:
    """``[tproxy] manage = true``: own, set up around the block, tear down after it.

    First the ownership lock of this network namespace (rule 7); a live owner
    elsewhere means nothing is touched, neither now nor at exit. Setting up
    converges from whatever a killed owner left behind (rule 3). Only a process
    that set the state up tears it down, and not when an operator took it over
    with ``--force`` meanwhile. While the block runs, the guard
    (:mod:`gateway.tproxy.guard`, in the serving process) keeps the state as set
    up, and applies a changed ``[tproxy]`` on reload. Without ``manage`` (or
    ``[tproxy]``) this does nothing.

    Raises:
        TproxyError: another live process owns the state, or setup failed (the
            block does not run).
    """
    if config.tproxy is None or not config.tproxy.manage:
        yield
        return
    try:
        ownership = tproxy_owner.acquire(config.path, "l4gw run")
    except tproxy_owner.Held as exc:
        raise TproxyError(
            f"{exc}; this start changes nothing and exits (stop that gateway first, or run "
            "this one in its own network namespace)"
        ) from None
    except tproxy_owner.OwnershipError as exc:
        raise TproxyError(str(exc)) from None
    try:
        for change in apply(config):
            log.info("tproxy: %s", change)
    except BaseException:
        ownership.release()
        raise
    ownership.installed = config
    log.info("tproxy: set up (%s)", summary(plan(config)))
    try:
        yield
    finally:
        try:
            forced = ownership.forced()
            if forced is not None:
                log.warning("tproxy: not torn down: %s took the state over", forced.describe())
            else:
                teardown()
                log.info("tproxy: torn down")
        except TproxyError as exc:
            log.error("tproxy: %s; run l4gw tproxy teardown -c %s", exc, config.path)
        finally:
            ownership.release()


def summary(p: Plan) -> str:
    versions = "+".join(f"IPv{v}" for v in p.versions)
    return (
        f"table {TABLE_FAMILY} {TABLE_NAME} with {len(p.rules)} rules; "
        f"fwmark rule and local route for {versions}"
    )
