"""TPROXY plumbing in the kernel: read what is installed, apply the plan, tear it down.

What ``[tproxy]`` asks for is computed by :func:`gateway.tproxy.plan.plan` (pure);
this module reads the kernel's state back (:func:`read_state`, :func:`read_own`),
makes the plan true (:func:`apply`) or undoes it (:func:`teardown`), through
libnftables (:mod:`gateway.tproxy.nftables`) and netlink (pyroute2,
:mod:`gateway.tproxy.rtdump`).

Rules kept:

1. **One table, replaced atomically.** Everything in nftables lives in the
   table ``inet l4gw``; :func:`apply` sends "add, delete, add the table, then its
   chain and rules" as one libnftables batch, so the kernel swaps the old table
   for the new one in a single transaction and a failed setup changes nothing.
2. **Teardown needs no memory.** :func:`teardown` removes the table and whatever
   carries the plan's tag (:data:`gateway.tproxy.plan.RTPROT_L4GW`), so it cleans
   up after a gateway killed with SIGKILL, whatever config that one ran.
3. **Idempotent.** :func:`apply` converges: stale tagged rules and routes are
   removed, missing ones added, present ones left alone; applying twice leaves
   the same state.
4. **Routing before interception.** :func:`apply` installs the route, then the
   rule, then the nftables table; :func:`teardown` removes them in reverse, so
   no marked packet ever finds half a setup.
5. **Never take over what is not ours.** :func:`apply` refuses, changing
   nothing, when :func:`gateway.tproxy.plan.conflicts` finds something.
6. **One owner, and only the owner changes it.** The state is one per network
   namespace, so a managing gateway first takes that namespace's ownership
   lock (:mod:`gateway.tproxy.owner`); a second start finds it held and
   touches nothing. The owner's guard (:mod:`gateway.tproxy.guard`) restores
   what someone else removed or changed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from gateway.config import Config
from gateway.linux import FR_ACT_TO_TBL, RT_SCOPE_HOST, RTN_LOCAL
from gateway.tproxy import owner as tproxy_owner
from gateway.tproxy import rtdump
from gateway.tproxy.nftables import Nftables, NftablesError
from gateway.tproxy.plan import (
    RTPROT_L4GW,
    TABLE_FAMILY,
    TABLE_NAME,
    TABLE_REF,
    ChainState,
    ForeignRule,
    IpRule,
    LocalRoute,
    Plan,
    State,
    TproxyError,
    conflicts,
    nft_teardown,
    plan,
    summary,
)

log = logging.getLogger("l4gw.tproxy")

_FAMILIES: Final = {4: socket.AF_INET, 6: socket.AF_INET6}


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
        return nft.run([{"list": {"table": TABLE_REF}}])
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
