"""Rate limits and connection caps on new connections (``[plugin.ratelimit]``).

Token buckets on new connections per client IP, per client prefix (/24,
/64), per listener and per route; caps on concurrent connections per client
IP and per cluster. A refused connection is closed with RST or FIN
(``refuse_with``) and carries the rule that refused it (``Refusal.rule``:
the core logs it, the access log and metrics count it).

Optional shaping (``bytes_per_second``) paces every connection's bytes in
both directions; it takes the relay over (plugins/ratelimit/shaping.py), so
shaped flows stay in userspace.

Where each check runs: client, prefix and listener rules and the per-client
cap in ``l4gw_admit`` (before any byte is read); the per-route rule and the
per-cluster cap in ``l4gw_routed``, the one place where the route is known
and nothing is connected yet.

Backends for the buckets: ``memory`` (this process), or ``redis`` (shared by
every gateway process and host using the same Redis; see
plugins/ratelimit/redis.py, its keys in plugins/ratelimit/redis_schema.py).
Connection caps are always per process: they count live connections, which
a crashed process could never give back to a shared store.

Rules kept here:

* **Bounded memory.** Buckets live in one LRU table capped at
  ``max_tracked`` (plugins/ratelimit/buckets.py); the size, the cap and the
  evictions are exported as metrics.
* **A connection takes a token from every bucket that applies, or from
  none**: all are checked before any is taken, so a refusal by one rule does
  not cost the client tokens of the others.
* **Decisions apart from I/O.** The buckets are plain values on an explicit
  clock (plugins/ratelimit/buckets.py); this module holds the section, the
  hooks and the connection counts.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from opentelemetry import metrics

from gateway import Config, Field, Flow, Invalid, Refusal, Route, hookimpl
from gateway import schema as s

from .buckets import (
    BACKEND_ERROR,
    BACKEND_LOCAL,
    Backend,
    Check,
    MemoryBuckets,
    Rule,
    client_prefix,
)
from .redis import RedisBuckets, RedisSettings
from .redis_schema import REDIS_SCHEMA
from .shaping import shaped_relay
from .shield import FIELD as SHIELD_AFTER
from .shield import ShieldAfter

log = logging.getLogger("l4gw.ratelimit")


def _rule_table(extra: Mapping[str, Field] | None = None) -> Callable[[Any], dict[str, Any]]:
    schema = {
        "rate": Field(s.integer(1), doc="new connections allowed per `per`"),
        "per": Field(s.duration, 1.0, 'the period of `rate` ("1s", "1m")'),
        "burst": Field(s.integer(0), 0, "bucket size: connections allowed at once (0: = rate)"),
        **(extra or {}),
    }
    table = s.table(schema)

    def convert(value: Any) -> dict[str, Any]:
        rule: dict[str, Any] = table(value)
        if rule["per"] <= 0:
            raise Invalid(problems=[(".per", "must be longer than 0s")])
        return rule

    return convert


PREFIX_LENGTHS = {
    "v4": Field(s.integer(0, 32), 24, "IPv4 prefix length clients are grouped by"),
    "v6": Field(s.integer(0, 128), 64, "IPv6 prefix length clients are grouped by"),
}


SCHEMA: dict[str, Field] = {
    "per_client": Field(_rule_table(), None, "token bucket per client IP"),
    "per_prefix": Field(
        _rule_table(PREFIX_LENGTHS), None, "token bucket per client prefix (v4 = 24, v6 = 64)"
    ),
    "per_listener": Field(_rule_table(), None, "token bucket per listener"),
    "per_route": Field(_rule_table(), None, "token bucket per route"),
    "max_connections_per_client": Field(s.integer(0), 0, "concurrent connections per IP (0: off)"),
    "max_connections_per_cluster": Field(s.integer(0), 0, "concurrent connections per cluster"),
    "refuse_with": Field(s.choice("rst", "fin"), "rst", "how a refused connection is closed"),
    "max_tracked": Field(s.integer(1), 100_000, "most buckets kept (LRU eviction beyond)"),
    "backend": Field(s.choice("memory", "redis"), "memory", "where buckets live"),
    **REDIS_SCHEMA,
    "bytes_per_second": Field(
        s.size, 0, "pace each connection to this many bytes/s per direction (0: off)"
    ),
    "shield_after": SHIELD_AFTER,
}


# --- the plugin ----------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The validated ``[plugin.ratelimit]`` section, compiled."""

    admit_rules: tuple[Rule, ...]
    route_rule: Rule | None
    prefix_v4: int
    prefix_v6: int
    max_per_client: int
    max_per_cluster: int
    reset: bool
    bytes_per_second: int
    raw: Mapping[str, Any]

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Settings:
        admit = tuple(
            Rule.from_config(name, section[name])
            for name in ("per_client", "per_prefix", "per_listener")
            if section.get(name)
        )
        route = section.get("per_route")
        prefix = section.get("per_prefix") or {}
        return cls(
            admit_rules=admit,
            route_rule=Rule.from_config("per_route", route) if route else None,
            prefix_v4=prefix.get("v4", 24),
            prefix_v6=prefix.get("v6", 64),
            max_per_client=section.get("max_connections_per_client", 0),
            max_per_cluster=section.get("max_connections_per_cluster", 0),
            reset=section.get("refuse_with", "rst") == "rst",
            bytes_per_second=section.get("bytes_per_second", 0),
            raw=section,
        )


class RateLimit:
    """The ``ratelimit`` plugin.

    Args:
        clock: monotonic seconds (tests pass their own).
        meter_provider: where the metrics go (default: the global one, which
            the telemetry plugin configures).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.clock = clock
        self.settings = Settings.from_config({})
        self.memory = MemoryBuckets(100_000)
        self.shared: Backend | None = None
        self.refused: Counter[str] = Counter()
        """Refusals by rule."""
        self.per_client: dict[str, int] = {}
        """Open connections per client IP (when the cap is on)."""
        self.per_cluster: dict[str, int] = {}
        """Open connections per cluster (when the cap is on)."""
        self._counted: dict[int, tuple[str | None, str | None]] = {}
        self._nursery: trio.Nursery | None = None
        self.shield_after = ShieldAfter(clock)
        """``shield_after``: refusals counted per client (plugins/ratelimit/shield.py)."""
        meter = metrics.get_meter("l4gw.ratelimit", meter_provider=meter_provider)
        self._m_refused = meter.create_counter(
            "l4gw.ratelimit.refused", "{connection}", "connections refused, by rule"
        )
        self._m_evicted = meter.create_counter(
            "l4gw.ratelimit.evicted", "{bucket}", "buckets evicted by the max_tracked cap"
        )
        self._evicted_seen = 0
        meter.create_observable_gauge(
            "l4gw.ratelimit.buckets", [self._observe_buckets], "{bucket}", "buckets tracked"
        )
        meter.create_observable_gauge(
            "l4gw.ratelimit.buckets.limit",
            [self._observe_cap],
            "{bucket}",
            "the max_tracked cap",
        )

    # -- decisions -------------------------------------------------------------------

    def refuse(self, rule: str, reason: str) -> Refusal:
        self.refused[rule] += 1
        self._m_refused.add(1, {"l4gw.ratelimit.rule": rule})
        return Refusal(reason, rule=rule, reset=self.settings.reset)

    def admit(self, flow: Flow) -> Refusal | Awaitable[Refusal | None] | None:
        st = self.settings
        ip = flow.client[0]
        if st.max_per_client and self.per_client.get(ip, 0) >= st.max_per_client:
            return self.refuse(
                "max_connections_per_client", f"{ip} has {st.max_per_client} connections open"
            )
        if st.admit_rules:
            checks = [(rule, self._key(rule, flow)) for rule in st.admit_rules]
            if self.shared is not None:
                return self._admit_shared(flow, checks)
            refused = self.memory.acquire(checks, self.clock())
            self._note_evictions()
            if refused is not None:
                return self.refuse(refused.name, f"rate limited ({refused.name} {ip})")
        self._count_client(flow)
        return None

    async def _shared_acquire(self, checks: list[Check]) -> str | None:
        """The shared backend's answer; with the local buckets while it is unreachable."""
        assert self.shared is not None
        refused = await self.shared.acquire(checks)
        if refused == BACKEND_LOCAL:
            local = self.memory.acquire(checks, self.clock())
            return None if local is None else local.name
        return refused

    async def _admit_shared(self, flow: Flow, checks: list[Check]) -> Refusal | None:
        refused = await self._shared_acquire(checks)
        if refused is not None:
            return self.refuse(refused, self._reason(refused, flow))
        self._count_client(flow)
        return None

    def routed(self, flow: Flow, route: Route) -> Refusal | Awaitable[Refusal | None] | None:
        st = self.settings
        cluster = route.cluster.name
        if st.max_per_cluster and self.per_cluster.get(cluster, 0) >= st.max_per_cluster:
            return self.refuse(
                "max_connections_per_cluster",
                f"cluster {cluster} has {st.max_per_cluster} connections open",
            )
        if st.route_rule is not None:
            checks = [(st.route_rule, route.name)]
            if self.shared is not None:
                return self._routed_shared(flow, cluster, checks)
            if self.memory.acquire(checks, self.clock()) is not None:
                return self.refuse("per_route", f"rate limited (per_route {route.name})")
        self._count_cluster(flow, cluster)
        return None

    async def _routed_shared(self, flow: Flow, cluster: str, checks: list[Check]) -> Refusal | None:
        refused = await self._shared_acquire(checks)
        if refused is not None:
            return self.refuse(refused, self._reason(refused, flow))
        self._count_cluster(flow, cluster)
        return None

    def _reason(self, rule: str, flow: Flow) -> str:
        if rule == BACKEND_ERROR:
            return "rate-limit backend unreachable (on_backend_error = closed)"
        return f"rate limited ({rule} {flow.client[0]})"

    def _key(self, rule: Rule, flow: Flow) -> str:
        if rule.name == "per_client":
            return flow.client[0]
        if rule.name == "per_prefix":
            st = self.settings
            return client_prefix(flow.client[0], st.prefix_v4, st.prefix_v6)
        return flow.listener

    # -- connection counts -------------------------------------------------------------

    def _count_client(self, flow: Flow) -> None:
        if not self.settings.max_per_client:
            return
        ip = flow.client[0]
        self.per_client[ip] = self.per_client.get(ip, 0) + 1
        self._counted[flow.id] = (ip, None)

    def _count_cluster(self, flow: Flow, cluster: str) -> None:
        if not self.settings.max_per_cluster:
            return
        self.per_cluster[cluster] = self.per_cluster.get(cluster, 0) + 1
        ip = self._counted.get(flow.id, (None, None))[0]
        self._counted[flow.id] = (ip, cluster)

    def closed(self, flow: Flow) -> None:
        ip, cluster = self._counted.pop(flow.id, (None, None))
        if ip is not None:
            _decrement(self.per_client, ip)
        if cluster is not None:
            _decrement(self.per_cluster, cluster)

    # -- metrics -------------------------------------------------------------------------

    def tracked(self) -> int:
        return len(self.memory.table) + (self.shared.tracked() if self.shared else 0)

    def evictions(self) -> int:
        return self.memory.table.evictions + (self.shared.evictions() if self.shared else 0)

    def _note_evictions(self) -> None:
        evicted = self.evictions()
        if evicted != self._evicted_seen:
            self._m_evicted.add(evicted - self._evicted_seen)
            self._evicted_seen = evicted

    def _observe_buckets(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        self._note_evictions()
        yield metrics.Observation(self.tracked())

    def _observe_cap(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        yield metrics.Observation(self.memory.table.cap)

    # -- configuration -------------------------------------------------------------------

    def configure(self, section: Mapping[str, Any]) -> None:
        settings = Settings.from_config(section)
        cap = section.get("max_tracked", 100_000)
        if cap != self.memory.table.cap:
            self.memory = MemoryBuckets(cap)
        shared = self.shared
        if section.get("backend") == "redis":
            wanted = RedisSettings.from_config(section)
            if not (isinstance(shared, RedisBuckets) and shared.settings == wanted):
                shared = RedisBuckets(wanted)
        else:
            shared = None
        if shared is not self.shared:
            if self.shared is not None:
                self.shared.stop()  # gives back the tokens it holds
            self.shared = shared
            if shared is not None and self._nursery is not None:
                shared.start(self._nursery)
        self.settings = settings
        self.shield_after.configure(section)

    def idle_hooks(self) -> frozenset[str]:
        """The per-connection hooks the section in force needs none of: with nothing
        configured the plugin costs a connection nothing (hookspecs: l4gw_configure).
        Connection counts are kept (admit, routed) and given back (closed) only
        under the caps that read them."""
        st = self.settings
        idle = set()
        if not (st.admit_rules or st.max_per_client or self.shield_after.threshold is not None):
            idle.add("l4gw_admit")
        if not (st.route_rule or st.max_per_cluster):
            idle.add("l4gw_routed")
        if not (st.max_per_client or st.max_per_cluster):
            idle.add("l4gw_connection_closed")
        if not st.bytes_per_second:
            idle.add("l4gw_relay")
        return frozenset(idle)

    # -- hooks -----------------------------------------------------------------------------

    @hookimpl
    def l4gw_config_sections(self) -> Mapping[str, Mapping[str, Field]]:
        return {"ratelimit": SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        self.configure(config.plugin("ratelimit"))
        return self.idle_hooks()

    @hookimpl
    def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self.shared is not None:
            self.shared.start(nursery)

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal | Awaitable[Refusal | None] | None:
        return self.shield_after.admit(flow, self.admit)

    @hookimpl
    def l4gw_routed(self, flow: Flow, route: Route) -> Refusal | Awaitable[Refusal | None] | None:
        return self.routed(flow, route)

    @hookimpl(tryfirst=True)
    def l4gw_relay(
        self, flow: Flow, client: socket.socket, upstream: socket.socket, idle_timeout: float
    ) -> Awaitable[str] | None:
        # tryfirst: a shaped flow must not be handed to a kernel tier, which cannot pace.
        rate = self.settings.bytes_per_second
        if not rate:
            return None
        flow.tier = "copy"
        flow.set_attribute("l4gw.ratelimit.bytes_per_second", rate)
        return shaped_relay(client, upstream, flow, idle_timeout, rate)

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.closed(flow)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


plugin = RateLimit()
"""The instance the ``ratelimit`` entry point registers."""
