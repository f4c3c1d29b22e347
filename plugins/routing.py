"""Built-in routing: match ``[[route]]`` tables, pick endpoints round robin.

Routes are matched in file order; the first whose every condition holds wins
(listener, original destination CIDR, destination port, SNI exact or
``*.domain``, client CIDR; an absent condition matches everything). A route
may split new connections across clusters by weight. The endpoints of the
chosen cluster are offered in round-robin order: the first is the one to
use, the rest are where the core retries when a connect fails.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from gateway import ClusterConfig, Config, Endpoint, Flow, Route, RouteConfig, hookimpl

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class _Compiled:
    config: RouteConfig
    clusters: tuple[ClusterConfig, ...]
    weights: tuple[int, ...]
    exact_sni: frozenset[str]
    wildcard_sni: tuple[str, ...]
    """Suffixes with their leading dot: "*.example.org" -> ".example.org"."""

    def matches(self, flow: Flow, dst: IPAddress, src: IPAddress) -> bool:
        c = self.config
        if c.ports and flow.destination[1] not in c.ports:
            return False
        if c.destination and not any(dst in net for net in c.destination):
            return False
        if c.source and not any(src in net for net in c.source):
            return False
        if c.sni:
            sni = flow.sni
            if sni is None:
                return False
            if sni not in self.exact_sni and not any(sni.endswith(w) for w in self.wildcard_sni):
                return False
        return True


class RoundRobin:
    """Endpoint order per cluster: rotate by one for each new connection."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def order(self, cluster: ClusterConfig) -> tuple[Endpoint, ...]:
        endpoints = cluster.endpoints
        i = self._next.get(cluster.name, 0) % len(endpoints)
        self._next[cluster.name] = i + 1
        return endpoints[i:] + endpoints[:i]


class Router:
    """The compiled route table of one configuration."""

    def __init__(self, config: Config) -> None:
        self.by_listener: dict[str, list[_Compiled]] = {}
        for rc in config.routes:
            sni = [p for p in rc.sni if not p.startswith("*.")]
            wild = tuple(p[1:] for p in rc.sni if p.startswith("*."))
            compiled = _Compiled(
                config=rc,
                clusters=tuple(config.clusters[name] for name, _ in rc.clusters),
                weights=tuple(w for _, w in rc.clusters),
                exact_sni=frozenset(sni),
                wildcard_sni=wild,
            )
            self.by_listener.setdefault(rc.listener, []).append(compiled)

    def match(self, flow: Flow) -> _Compiled | None:
        routes = self.by_listener.get(flow.listener)
        if not routes:
            return None
        dst = ip_address(flow.destination[0])
        src = ip_address(flow.client[0])
        for route in routes:
            if route.matches(flow, dst, src):
                return route
        return None


def pick_cluster(clusters: Sequence[ClusterConfig], weights: Sequence[int]) -> ClusterConfig:
    if len(clusters) == 1:
        return clusters[0]
    return random.choices(clusters, weights=weights)[0]


_router: Router | None = None
_balancer = RoundRobin()


@hookimpl
def l4gw_configure(config: Config) -> None:
    global _router
    _router = Router(config)


@hookimpl(trylast=True)
def l4gw_route(flow: Flow, config: Config) -> Route | None:
    if _router is None:
        return None
    matched = _router.match(flow)
    if matched is None:
        return None
    cluster = pick_cluster(matched.clusters, matched.weights)
    return Route(matched.config.name, cluster, _balancer.order(cluster))
