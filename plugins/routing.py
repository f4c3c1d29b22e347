"""Built-in routing: match ``[[route]]`` tables, split, balance, skip the unhealthy.

Routes are matched in file order; the first whose every condition holds wins
(listener, original destination CIDR, destination port, SNI exact or
``*.domain``, ALPN: the client offers one of the route's protocols, client
CIDR; an absent condition matches everything). A route
may split new connections across clusters by weight (smooth weighted round
robin: a 9:1 canary split sends exactly 1 of every 10). The chosen cluster's
``balance`` algorithm (plugins/balance.py) orders its available endpoints:
the first is the one to use, the rest are where the core retries when a
connect fails, up to ``connect_attempts``.

Rules kept here:

* **Only available endpoints are offered**: healthy by the active checks and
  not ejected (plugins/health.py), weight above zero. When none is left,
  ``on_no_healthy = "refuse"`` returns the route with no endpoint (the core
  closes the connection, "no endpoint available"), and ``"panic"`` offers
  all of them anyway: a health check that is wrong everywhere must not take
  the whole service down.
* **Active connections are counted here**, per (cluster, endpoint), from a
  successful connect attempt to the connection's close, for least_conn and
  random_two. Under a configuration where no cluster balances by load, the two
  counting hooks are declared idle (``l4gw_configure``): a connection that starts
  then is not counted, and costs neither hook. A reload that brings a load-aware
  cluster counts the connections that start after it; those opened before it
  are not seen (a connection is counted from its connect to its close or not at
  all, never half).
* **A reload keeps balancer state** (round-robin position, Maglev table) for
  every cluster whose endpoints and algorithm did not change.
* **Endpoint sets come from discovery** (``gateway.discovery``): names followed
  in DNS, an ``endpoints_file``, a plugin. A change of one cluster's set
  rebuilds that cluster's balancers only (a new Maglev table); the others keep
  theirs, and active counts carry over for the addresses that stay. A cluster
  with no endpoint at all gets a route with none (the core closes the
  connection ``no_endpoint``).
* **Priorities** (SRV): the lowest priority group's available endpoints are
  offered first, each group balanced on its own; the next groups follow only
  as fallbacks (the connect retries), and take new connections first only when
  no endpoint of a lower group is available.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from ipaddress import ip_address
from typing import Final

from gateway import ClusterConfig, Config, Endpoint, Flow, Route, RouteConfig, discovery, hookimpl

from .balance import LOAD_AWARE, Balancer, SmoothWeighted, make_balancer
from .health import Health
from .health import plugin as health_plugin

log = logging.getLogger("l4gw.routing")

_COUNTING: Final = frozenset({"l4gw_connect_attempt", "l4gw_connection_closed"})
"""The hooks that count active connections: idle where no balancer reads them."""

# Parsing an address costs ~2 µs per connection; clients and service
# addresses repeat, so a bounded cache takes that off the connection path.
_ip = lru_cache(maxsize=65536)(ip_address)


@lru_cache(maxsize=65536)
def _packed(address: str) -> bytes:
    """The client's address as the balancers take it (one cache hit per flow)."""
    return ip_address(address).packed


@dataclass(frozen=True, slots=True, eq=False)
class _Split:
    """One cluster of a route's weighted split (hashed by identity)."""

    cluster: ClusterConfig
    weight: int


@dataclass(eq=False)
class _Compiled:
    config: RouteConfig
    splits: tuple[_Split, ...]
    exact_sni: frozenset[str]
    wildcard_sni: tuple[str, ...]
    """Suffixes with their leading dot: "*.example.org" -> ".example.org"."""
    alpn: frozenset[str]
    """The route's protocols as the ClientHello peek decodes them (latin-1)."""
    rr: SmoothWeighted[_Split] = field(default_factory=SmoothWeighted)
    always: bool = False
    """No condition: it takes every flow of its listener (asked no question per flow)."""

    def __post_init__(self) -> None:
        c = self.config
        self.always = not (c.ports or c.destination or c.source or self.alpn or c.sni)

    def matches(self, flow: Flow) -> bool:
        c = self.config
        if c.ports and flow.destination[1] not in c.ports:
            return False
        if c.destination:
            dst = _ip(flow.destination[0])
            if not any(dst in net for net in c.destination):
                return False
        if c.source:
            src = _ip(flow.client[0])
            if not any(src in net for net in c.source):
                return False
        if self.alpn and self.alpn.isdisjoint(flow.alpn):
            return False
        if c.sni:
            sni = flow.sni
            if sni is None:
                return False
            if sni not in self.exact_sni and not any(sni.endswith(w) for w in self.wildcard_sni):
                return False
        return True

    def pick_cluster(self) -> ClusterConfig:
        if len(self.splits) == 1:
            return self.splits[0].cluster
        return self.rr.pick([s for s in self.splits if s.weight > 0]).cluster


class Router:
    """The compiled route table of one configuration."""

    def __init__(self, config: Config) -> None:
        self.by_listener: dict[str, list[_Compiled]] = {}
        for rc in config.routes:
            sni = [p for p in rc.sni if not p.startswith("*.")]
            wild = tuple(p[1:] for p in rc.sni if p.startswith("*."))
            compiled = _Compiled(
                config=rc,
                splits=tuple(_Split(config.clusters[name], w) for name, w in rc.clusters),
                exact_sni=frozenset(sni),
                wildcard_sni=wild,
                # A config name is sent as its UTF-8 bytes; the peek decodes each byte
                # as one latin-1 character, so compare in that form.
                alpn=frozenset(p.encode().decode("latin-1") for p in rc.alpn),
            )
            self.by_listener.setdefault(rc.listener, []).append(compiled)

    def match(self, flow: Flow) -> _Compiled | None:
        for route in self.by_listener.get(flow.listener, ()):
            if route.always or route.matches(flow):
                return route
        return None


@dataclass(eq=False)
class _Group:
    """The endpoints of one priority, with their own balancer."""

    priority: int
    balancer: Balancer
    members: tuple[Endpoint, ...]
    """Endpoints with a weight above zero."""


@dataclass(eq=False)
class _ClusterState:
    endpoints: tuple[Endpoint, ...]
    balance: str
    groups: tuple[_Group, ...]
    """By priority, lowest first; one group when no endpoint has a priority."""

    @property
    def members(self) -> tuple[Endpoint, ...]:
        return tuple(e for g in self.groups for e in g.members)


def cluster_state(endpoints: tuple[Endpoint, ...], balance: str) -> _ClusterState:
    priorities = sorted({e.priority for e in endpoints}) or [0]
    groups = []
    for p in priorities:
        group = tuple(e for e in endpoints if e.priority == p)
        groups.append(
            _Group(p, make_balancer(balance, group), tuple(e for e in group if e.weight > 0))
        )
    return _ClusterState(endpoints, balance, tuple(groups))


class Routing:
    """The routing plugin: route table, balancers, active-connection counts.

    Args:
        health: where endpoint availability comes from.
    """

    def __init__(self, health: Health, registry: discovery.Registry | None = None) -> None:
        self.health = health
        self.registry = registry if registry is not None else discovery.registry
        self._subscribed = False
        self.router: Router | None = None
        self.clusters: dict[str, _ClusterState] = {}
        self.active: dict[tuple[str, str, int], int] = {}
        """Open connections per (cluster, host, port)."""
        self._open: dict[int, tuple[str, str, int]] = {}
        self._panicking: set[str] = set()

    def load_of(self, cluster: str, endpoint: Endpoint) -> int:
        return self.active.get((cluster, endpoint.host, endpoint.port), 0)

    def configure(self, config: Config) -> None:
        if not self._subscribed:
            self.registry.subscribe(self.endpoints_changed)
            self._subscribed = True
        clusters: dict[str, _ClusterState] = {}
        for name, cc in config.clusters.items():
            old = self.clusters.get(name)
            endpoints = self.registry.current(cc)
            if old is not None and old.endpoints == endpoints and old.balance == cc.balance:
                clusters[name] = old
                continue
            clusters[name] = cluster_state(endpoints, cc.balance)
        self.clusters = clusters
        self.router = Router(config)

    def endpoints_changed(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        """A cluster's set changed (a registry subscriber): rebuild its balancers only."""
        old = self.clusters.get(cluster)
        if old is not None and old.endpoints != endpoints:
            self.clusters[cluster] = cluster_state(endpoints, old.balance)

    # The per-connection hooks are these methods themselves (``specname``), not
    # wrappers that call them: a Python call less per hook per connection.
    @hookimpl(specname="l4gw_route", trylast=True)
    def route(self, flow: Flow) -> Route | None:
        """The route for ``flow``."""
        if self.router is None:
            return None
        matched = self.router.match(flow)
        if matched is None:
            return None
        splits = matched.splits
        # pick_cluster's own first case, without the call: most routes name one cluster.
        cluster = splits[0].cluster if len(splits) == 1 else matched.pick_cluster()
        client = _packed(flow.client[0])
        return Route(matched.config.name, cluster, self.endpoints(cluster, flow, client))

    def endpoints(self, cluster: ClusterConfig, flow: Flow, client: bytes) -> tuple[Endpoint, ...]:
        """The endpoints of ``cluster`` to try for ``flow``, in order."""
        state = self.clusters.get(cluster.name)
        if state is None or not state.endpoints:
            return ()
        name = cluster.name
        attempts = cluster.connect_attempts
        if len(state.groups) > 1:
            return self._by_priority(cluster, flow, state, client)
        candidates: Sequence[Endpoint] = self.health.filter(name, state.groups[0].members)
        if not candidates:
            candidates = self._no_healthy(cluster, flow, state)
            if not candidates:
                return ()
        elif name in self._panicking:
            self._panicking.discard(name)
            log.warning("cluster %s: endpoints available again, panic mode over", name)
        if len(candidates) == 1:
            # What every balancer orders one candidate to (round robin's scores stay
            # as they are), without asking it: the usual single-backend cluster.
            return (candidates[0],)
        balancer = state.groups[0].balancer
        return balancer.order(candidates, lambda e: self.load_of(name, e), client, attempts)

    def _by_priority(
        self, cluster: ClusterConfig, flow: Flow, state: _ClusterState, client: bytes
    ) -> tuple[Endpoint, ...]:
        """Each priority group's available endpoints in balancer order, lowest first."""
        name = cluster.name
        attempts = cluster.connect_attempts
        out: list[Endpoint] = []
        for group in state.groups:
            candidates = self.health.filter(name, group.members)
            if candidates:
                out.extend(
                    group.balancer.order(
                        candidates, lambda e: self.load_of(name, e), client, attempts - len(out)
                    )
                )
                if len(out) >= attempts:
                    break
        if out:
            if name in self._panicking:
                self._panicking.discard(name)
                log.warning("cluster %s: endpoints available again, panic mode over", name)
            return tuple(out)
        return tuple(self._no_healthy(cluster, flow, state))[:attempts]

    def _no_healthy(
        self, cluster: ClusterConfig, flow: Flow, state: _ClusterState
    ) -> Sequence[Endpoint]:
        if cluster.on_no_healthy != "panic":
            flow.add_event("no_healthy_endpoint", cluster=cluster.name)
            return ()
        if cluster.name not in self._panicking:
            self._panicking.add(cluster.name)
            log.warning(
                "cluster %s: no healthy endpoint, panic mode: trying all of them", cluster.name
            )
        flow.add_event("panic", cluster=cluster.name)
        return state.members or state.endpoints

    # ``error`` has no default: pluggy leaves an argument with one out of the call.
    @hookimpl(specname="l4gw_connect_attempt")
    def connected(self, flow: Flow, endpoint: Endpoint, error: str | None) -> None:
        """Count ``flow`` on ``endpoint`` once connected (a failed attempt, ``error``
        set, counts nothing)."""
        if error is not None or flow.cluster is None:
            return
        key = (flow.cluster, endpoint.host, endpoint.port)
        self.active[key] = self.active.get(key, 0) + 1
        self._open[flow.id] = key

    @hookimpl(specname="l4gw_connection_closed")
    def closed(self, flow: Flow) -> None:
        """Count ``flow`` off its endpoint."""
        key = self._open.pop(flow.id, None)
        if key is None:
            return
        left = self.active.get(key, 0) - 1
        if left > 0:
            self.active[key] = left
        else:
            self.active.pop(key, None)

    # -- hooks ---------------------------------------------------------------

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        self.configure(config)
        if any(c.balance in LOAD_AWARE for c in config.clusters.values()):
            return None
        return _COUNTING  # no balancer reads the counts: connections cost no count


plugin = Routing(health_plugin)
"""The instance the ``routing`` entry point registers."""
