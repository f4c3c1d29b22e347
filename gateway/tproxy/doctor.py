"""``l4gw tproxy doctor``: what would make TPROXY fail silently, and the one-line fix.

TPROXY fails without a word in every interesting case: a packet marked but
routed onward, dropped as a martian, handed to no socket, or caught first by
somebody else's rule. The doctor gathers the facts once (:func:`gather`, the
only I/O here) and judges them with :func:`diagnose`, a pure function, so each
check is unit-tested on plain values.

Checks, each reported ok, warn or FAIL (FAIL makes the exit code non-zero):

* CAP_NET_ADMIN (setup, and IP_TRANSPARENT on the gateway's sockets);
* our nftables table present and current;
* per family, the fwmark ip rule and the ``local default`` route;
* IPv4 reverse-path filtering: strict ``rp_filter`` on the interfaces that
  intercepted or returning traffic arrives on, and ``src_valid_mark`` (the
  reverse lookup then carries our mark, finds the local route and drops the
  packet as a martian);
* forwarding, where transparent upstream makes this host the backends' route
  back to the clients;
* intercept interfaces that do not exist (the rule never matches);
* the intercepted listeners: listening, and transparent;
* conflicts: an ip rule at our priority or seeing our mark first, foreign
  routes in our table, other nftables tables doing TPROXY;
* iptables-legacy (x_tables) rules, which run beside nftables and which nft
  cannot list: one doing TPROXY is a conflict, one setting marks or
  rewriting destinations before the socket lookup a warning.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gateway.config import Config
from gateway.linux import CAP_NET_ADMIN
from gateway.tproxy.plan import (
    RTPROT_L4GW,
    TABLE_FAMILY,
    TABLE_NAME,
    Plan,
    State,
    TproxyError,
    conflicts,
    differences,
    plan,
)
from gateway.tproxy.sockdiag import ListeningSocket, listening
from gateway.tproxy.state import status

OK: Final = "ok"
WARN: Final = "warn"
FAIL: Final = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict."""

    level: str
    """``ok``, ``warn`` or ``FAIL``."""
    text: str
    fix: str = ""
    """One command or config change; empty when there is nothing to do."""


@dataclass(frozen=True)
class Facts:
    """What the doctor looked at (gathered by :func:`gather`)."""

    cap_net_admin: bool
    state: State | None
    state_error: str = ""
    interfaces: frozenset[str] = frozenset()
    sysctl: Mapping[str, int | None] = field(default_factory=dict)
    """Values under /proc/sys/net, e.g. ``{"ipv4/conf/all/rp_filter": 1}``; None if absent."""
    egress: Mapping[str, str | None] = field(default_factory=dict)
    """Transparent-upstream endpoint -> the interface the route to it leaves by."""
    listening: Mapping[str, tuple[ListeningSocket, ...]] = field(default_factory=dict)
    """Intercepted listener name -> sockets listening on its family and port."""
    legacy: Mapping[int, str | None] = field(default_factory=dict)
    """IP version -> ``ip[6]tables-legacy-save`` output for the x_tables tables in use
    (only versions with tables in use); None when they exist but could not be read."""


def watched_interfaces(config: Config, facts: Facts) -> list[str]:
    """Interfaces whose IPv4 reverse-path settings decide whether TPROXY'd packets live."""
    tc = config.tproxy
    names: set[str] = set()
    if tc is not None:
        for ic in tc.intercept:
            names.update(ic.interfaces or (facts.interfaces - {"lo"}))
    names.update(i for i in facts.egress.values() if i)
    return sorted(n for n in names if n in facts.interfaces)


def sysctl_keys(config: Config, interfaces: Sequence[str]) -> list[str]:
    keys = [
        "ipv4/ip_forward",
        "ipv6/conf/all/forwarding",
        "ipv4/conf/all/rp_filter",
        "ipv4/conf/all/src_valid_mark",
        "ipv4/conf/all/accept_local",
    ]
    for name in interfaces:
        keys += [f"ipv4/conf/{name}/{k}" for k in ("rp_filter", "src_valid_mark", "accept_local")]
    return keys


def diagnose(config: Config, p: Plan, facts: Facts) -> list[Finding]:
    """Judge ``facts`` against ``config`` and its plan ``p`` (pure)."""
    path = config.path
    setup = f"l4gw tproxy setup -c {path}"
    out: list[Finding] = []

    if facts.cap_net_admin:
        out.append(Finding(OK, "CAP_NET_ADMIN: present"))
    else:
        out.append(
            Finding(
                FAIL,
                "CAP_NET_ADMIN: missing; setup fails and the kernel refuses IP_TRANSPARENT",
                "run as root, or grant it (systemd: AmbientCapabilities=CAP_NET_ADMIN)",
            )
        )

    state = facts.state
    if state is None:
        error = f"cannot read nftables and routing: {facts.state_error}"
        out.append(Finding(FAIL, error, "run as root (or with CAP_NET_ADMIN)"))
    else:
        out.extend(_installed(p, state, setup))

    sysctl = facts.sysctl
    for name in watched_interfaces(config, facts):
        out.extend(_reverse_path(name, sysctl))

    out.extend(_forwarding(config, sysctl))

    tc = config.tproxy
    if tc is not None:
        for i, ic in enumerate(tc.intercept):
            for name in ic.interfaces:
                if name not in facts.interfaces:
                    out.append(
                        Finding(
                            FAIL,
                            f"tproxy.intercept[{i}]: no interface {name} here; "
                            "its rule never matches",
                            f"fix tproxy.intercept[{i}].interfaces in {path}",
                        )
                    )
        for name in sorted({ic.listener for ic in tc.intercept}):
            out.extend(_listener(config, name, facts.listening.get(name, ())))
    for version, saved in sorted(facts.legacy.items()):
        out.extend(_legacy(version, saved))
    return out


_LEGACY_SHOWN = 3
"""Rules quoted per kind; the count covers the rest."""
_LEGACY_TARGET = re.compile(r"(?:^| )-j ([A-Z]+)\b")
_LEGACY_KINDS: Final = {
    "TPROXY": (FAIL, "does TPROXY too"),
    "mark": (WARN, "sets packet marks (ours may be overwritten)"),
    "divert": (WARN, "rewrites destinations before the socket lookup"),
}


def _legacy_kind(rule: str) -> str | None:
    """Which of :data:`_LEGACY_KINDS` an ``iptables-save`` rule is, if any."""
    match = _LEGACY_TARGET.search(rule)
    target = match.group(1) if match else ""
    if target == "TPROXY":
        return "TPROXY"
    if target in ("MARK", "CONNMARK"):
        return "mark"
    if target in ("DNAT", "REDIRECT"):
        return "divert"
    return None


def _legacy(version: int, saved: str | None) -> list[Finding]:
    """Judge the iptables-legacy rules of one IP version (``iptables-save`` text)."""
    tool = "iptables-legacy" if version == 4 else "ip6tables-legacy"
    if saved is None:
        return [
            Finding(
                WARN,
                f"IPv{version} iptables-legacy tables are in use but could not be read; "
                "nft does not show their rules",
                f"{tool}-save  (from the iptables package) lists them",
            )
        ]
    table = ""
    rules: list[tuple[str, str]] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            rules.append((table, line[3:].strip()))
    by_kind: dict[str, list[tuple[str, str]]] = {kind: [] for kind in _LEGACY_KINDS}
    for t, r in rules:
        kind = _legacy_kind(r)
        if kind is not None:
            by_kind[kind].append((t, r))
    out: list[Finding] = []
    for kind, found in by_kind.items():
        level, what = _LEGACY_KINDS[kind]
        for t, r in found[:_LEGACY_SHOWN]:
            text = f"IPv{version} iptables-legacy {t} rule {what}: -A {r}"
            if level == FAIL:
                text = f"conflict: {text}"
            out.append(Finding(level, text, f"{tool} -t {t} -D {r}  (if it is not meant for this)"))
        if len(found) > _LEGACY_SHOWN:
            more = f"IPv{version} iptables-legacy: {len(found) - _LEGACY_SHOWN} more {kind} rules"
            out.append(Finding(level, more, f"{tool}-save  lists them"))
    if not out:
        out.append(
            Finding(
                OK,
                f"IPv{version} iptables-legacy: {len(rules)} rules; none marks, diverts or "
                "does TPROXY",
            )
        )
    return out


def _installed(p: Plan, state: State, setup: str) -> list[Finding]:
    out: list[Finding] = []
    diffs = differences(p, state)
    table = f"nftables table {TABLE_FAMILY} {TABLE_NAME}"
    if not state.table:
        out.append(Finding(FAIL, f"{table}: missing; nothing is intercepted", setup))
    elif any(d.startswith("nftables") for d in diffs):
        detail = "; ".join(d for d in diffs if d.startswith("nftables"))
        out.append(Finding(FAIL, detail, f"{setup}  (replaces the table atomically)"))
    else:
        out.append(Finding(OK, f"{table}: matches the config ({len(p.rules)} rules)"))
    for rule in p.ip_rules:
        v = rule.version
        if rule in state.ip_rules:
            out.append(Finding(OK, f"IPv{v} fwmark rule: {rule}"))
        else:
            out.append(
                Finding(
                    FAIL,
                    f"IPv{v} fwmark rule missing ({rule}): marked packets are routed onward, "
                    "not delivered to the gateway",
                    f"{setup}  (or: ip -{v} rule add fwmark {rule.mark:#x} lookup {rule.table} "
                    f"priority {rule.priority} proto {RTPROT_L4GW})",
                )
            )
    for route in p.routes:
        v = route.version
        if route in state.routes:
            out.append(Finding(OK, f"IPv{v} local route: {route}"))
        else:
            out.append(
                Finding(
                    FAIL,
                    f"IPv{v} local route missing ({route}): marked packets are not delivered "
                    "locally",
                    f"{setup}  (or: ip -{v} route add local default dev lo table {route.table} "
                    f"proto {RTPROT_L4GW})",
                )
            )
    stale = [d for d in diffs if d.startswith("not in the config")]
    if stale:
        out.append(Finding(FAIL, "; ".join(stale), setup))
    for what, fix in conflicts(p, state):
        out.append(Finding(FAIL, f"conflict: {what}", fix))
    return out


def _reverse_path(name: str, sysctl: Mapping[str, int | None]) -> list[Finding]:
    out: list[Finding] = []
    every = sysctl.get("ipv4/conf/all/rp_filter") or 0
    own = sysctl.get(f"ipv4/conf/{name}/rp_filter") or 0
    # The kernel uses max(all, interface) for rp_filter.
    if max(every, own) == 1:
        pairs = (("all", every), (name, own))
        keys = [f"net.ipv4.conf.{n}.rp_filter=2" for n, v in pairs if v == 1]
        out.append(
            Finding(
                FAIL,
                f"rp_filter=1 (strict) on {name}: intercepted or returning packets whose "
                "reverse path is another interface are dropped silently",
                f"sysctl -w {' '.join(keys)}",
            )
        )
    else:
        out.append(Finding(OK, f"rp_filter on {name}: {max(every, own)}"))
    # src_valid_mark and accept_local: the kernel ORs all with the interface.
    valid_mark = (sysctl.get("ipv4/conf/all/src_valid_mark") or 0) or (
        sysctl.get(f"ipv4/conf/{name}/src_valid_mark") or 0
    )
    accept_local = (sysctl.get("ipv4/conf/all/accept_local") or 0) or (
        sysctl.get(f"ipv4/conf/{name}/accept_local") or 0
    )
    if valid_mark and not accept_local:
        keys = [
            f"net.ipv4.conf.{n}.src_valid_mark=0"
            for n in ("all", name)
            if sysctl.get(f"ipv4/conf/{n}/src_valid_mark")
        ]
        out.append(
            Finding(
                FAIL,
                f"src_valid_mark=1 on {name}: the reverse-path lookup carries our mark, finds "
                "the local route and drops marked packets as martians",
                f"sysctl -w {' '.join(keys)}  (or net.ipv4.conf.{name}.accept_local=1)",
            )
        )
    return out


def _forwarding(config: Config, sysctl: Mapping[str, int | None]) -> list[Finding]:
    versions: set[int] = set()
    for cluster in config.clusters.values():
        if cluster.upstream_source == "client":
            versions.update(6 if ":" in e.host else 4 for e in cluster.endpoints)
    out: list[Finding] = []
    for v in sorted(versions):
        key = "ipv4/ip_forward" if v == 4 else "ipv6/conf/all/forwarding"
        if sysctl.get(key) == 1:
            out.append(Finding(OK, f"IPv{v} forwarding: on"))
        else:
            out.append(
                Finding(
                    FAIL,
                    f'IPv{v} forwarding is off, but upstream_source = "client" makes this host '
                    "the backends' route back to the clients: their packets that belong to no "
                    "gateway socket (ICMP errors, late resets, other traffic) are dropped",
                    f"sysctl -w net.{key.replace('/', '.')}=1",
                )
            )
    return out


def _listener(config: Config, name: str, sockets: Sequence[ListeningSocket]) -> list[Finding]:
    lc = config.listener(name)
    wanted = [s for s in sockets if s.host == lc.host or _wildcard(s.host)]
    if not wanted:
        return [
            Finding(
                WARN,
                f"listener {name} ({lc.bind}): nothing listens yet; intercepted connections "
                "are reset until the gateway runs",
                f"l4gw run -c {config.path}",
            )
        ]
    if any(s.transparent is False for s in wanted):
        return [
            Finding(
                FAIL,
                f"listener {name} ({lc.bind}): the socket listening there is not transparent; "
                "TPROXY cannot hand it connections",
                f"set transparent = true on listener {name} (or stop what holds the port) "
                "and restart",
            )
        ]
    return [Finding(OK, f"listener {name} ({lc.bind}): listening, transparent")]


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


# --- gathering (I/O) --------------------------------------------------------------------------


def has_cap_net_admin(status_path: str = "/proc/self/status") -> bool:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def _read_sysctl(key: str) -> int | None:
    try:
        return int(Path("/proc/sys/net", key).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def gather(config: Config, p: Plan) -> Facts:
    """Look at the kernel: capabilities, installed state, sysctls, routes, sockets."""
    state: State | None = None
    error = ""
    try:
        state = status(config)[1]
    except TproxyError as exc:
        error = str(exc)
    interfaces, egress = _links_and_egress(config)
    facts = Facts(has_cap_net_admin(), state, error, interfaces, {}, egress, _listening(config))
    keys = sysctl_keys(config, watched_interfaces(config, facts))
    return Facts(
        facts.cap_net_admin,
        state,
        error,
        interfaces,
        {k: _read_sysctl(k) for k in keys},
        egress,
        facts.listening,
        {v: saved for v in (4, 6) if (saved := _legacy_rules(v)) != ""},
    )


def _legacy_rules(version: int) -> str | None:
    """The x_tables rules of this namespace, or "" when no table is in use.

    Only the tables the kernel lists as in use are read (``-t`` each): asking
    for another would load it, and the doctor changes nothing.
    """
    names = "ip_tables_names" if version == 4 else "ip6_tables_names"
    try:
        tables = Path("/proc/net", names).read_text().split()
    except OSError:
        return ""  # x_tables not loaded at all
    if not tables:
        return ""
    tool = shutil.which("iptables-legacy-save" if version == 4 else "ip6tables-legacy-save")
    if tool is None:
        return None
    parts = []
    for table in tables:
        try:
            done = subprocess.run(
                [tool, "-t", table], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        parts.append(done.stdout)
    return "".join(parts)


def _links_and_egress(config: Config) -> tuple[frozenset[str], dict[str, str | None]]:
    """Interface names (netlink, so right in any namespace) and, per transparent-upstream
    endpoint, the interface its route leaves by."""
    from pyroute2 import IPRoute

    endpoints = [
        e for c in config.clusters.values() if c.upstream_source == "client" for e in c.endpoints
    ]
    egress: dict[str, str | None] = {}
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for e in endpoints:
            try:
                routes = ipr.route("get", dst=e.host)
                egress[str(e)] = names.get(routes[0].get_attr("RTA_OIF"))
            except Exception:
                # No route to it: connecting fails loudly, nothing silent to report here.
                egress[str(e)] = None
    return frozenset(names.values()), egress


def _listening(config: Config) -> dict[str, tuple[ListeningSocket, ...]]:
    tc = config.tproxy
    if tc is None:
        return {}
    out: dict[str, tuple[ListeningSocket, ...]] = {}
    by_family: dict[socket.AddressFamily, list[ListeningSocket]] = {}
    for name in {ic.listener for ic in tc.intercept}:
        lc = config.listener(name)
        if lc.family not in by_family:
            try:
                by_family[lc.family] = listening(lc.family)
            except OSError:
                by_family[lc.family] = []
        out[name] = tuple(s for s in by_family[lc.family] if s.port == lc.port)
    return out


def doctor(config: Config) -> list[Finding]:
    """Gather and judge.

    Raises:
        TproxyError: no ``[tproxy]`` section, or an intercept the plan cannot serve.
    """
    p = plan(config)
    return diagnose(config, p, gather(config, p))
