"""The endpoint registry: each cluster's current endpoint set, combined from its sources.

A cluster's endpoints come from its literal addresses, each name and SRV name it
follows in DNS, its ``endpoints_file`` and a plugin that publishes them. Every
source reports its whole set through one call, :meth:`Registry.publish`: the DNS
``follow`` tasks, the file watcher and plugins alike. Routing and health read
the combined set and subscribe to its changes.

Rules kept here:

* **One registry per process.** Each worker resolves and watches on its own; the
  sets are never shared between processes (a worker that restarts starts over).
* **The combined set is in config order, one endpoint per address**: literal
  endpoints, then each followed name in the order of ``endpoints``, then the
  file's literal endpoints and its names, then the plugin's set. An address
  (host, port) that arrives by two routes is one endpoint: the first wins, with
  its weight, priority and origin. Literal endpoints are kept as written (a
  config may repeat one on purpose).
* **A change is detected by value** (host, port, weight, priority, in order):
  a source that publishes the same set again changes nothing; only a real
  change notifies the subscribers, bumps the cluster's version, writes ONE log
  line (cluster, added, removed) and counts in ``l4gw.discovery.changes``.
* **Nothing here cancels a connection.** Open connections hold the endpoint
  they connected to, not the set; a removed address only stops getting new ones.
* **Last good sets survive a reload.** :meth:`Registry.configure` keeps the set
  of every source a cluster still names (a follow task for an unchanged name
  keeps running; a cluster that newly names it gets its last answer at once),
  and stops the tasks of sources no cluster names any more.
* **State for a config the registry was not given is not its business.**
  :meth:`Registry.current` answers from the registry only for the exact
  :class:`ClusterConfig` it was configured with; for any other (a unit test's,
  the ``l4gw check`` of a file) the literal endpoints are the set.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from opentelemetry import metrics

from gateway.config import ClusterConfig, Config, DnsConfig, Endpoint, NamedEndpoint, SrvEndpoint
from gateway.discovery import dns as dns_client
from gateway.discovery import files
from gateway.schema import format_address

log = logging.getLogger("l4gw.discovery")

Spec = NamedEndpoint | SrvEndpoint
Key = tuple[str, str]
"""(origin, source) of one source of a cluster's set."""
Subscriber = Callable[[str, tuple[Endpoint, ...]], None]
"""Called with (cluster, its new set) after each change, synchronously."""

ORIGINS = ("literal", "name", "srv", "file", "plugin")

FIRST_ANSWER_GRACE = 1.0
"""Seconds beyond the DNS timeout that start-up waits for every name's first answer."""


class DiscoveryError(ValueError):
    """A plugin published something that is not an endpoint set."""


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """What one source last published for one cluster."""

    endpoints: tuple[Endpoint, ...]
    updated: float
    """Wall-clock time (``time.time()``) of the publication that last changed it."""


@dataclass(eq=False)
class _Cluster:
    config: ClusterConfig
    current: tuple[Endpoint, ...] = ()
    version: int = 0
    updated: float = 0.0


@dataclass(eq=False)
class _Task:
    """A follow task (per name spec) or a file watch (per path)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    first: trio.Event = field(default_factory=trio.Event)
    last: tuple[Endpoint, ...] | None = None
    """The last set delivered (None: nothing yet)."""
    updated: float = 0.0
    running: bool = False
    """Started in the registry's nursery (configure may come before there is one)."""


@dataclass(eq=False)
class _Watch(_Task):
    """A watched ``endpoints_file``."""

    watch: files.Watch = field(default_factory=lambda: files.Watch(""))


def spec_key(spec: Spec) -> Key:
    """The (origin, source) a name or SRV name publishes under."""
    if isinstance(spec, SrvEndpoint):
        return ("srv", spec.srv)
    return ("name", str(spec))


def name_specs(config: Config) -> list[tuple[str, Spec]]:
    """Every (cluster, name spec) of ``config``'s ``endpoints`` (not its files'):
    what ``l4gw check --resolve`` resolves."""
    return [(name, spec) for name, cc in config.clusters.items() for spec in cc.names]


def _describe(endpoints: Iterable[Endpoint]) -> str:
    parts = []
    for e in endpoints:
        text = format_address(e.host, e.port)
        if e.weight != 1:
            text += f" weight={e.weight}"
        if e.priority:
            text += f" priority={e.priority}"
        parts.append(text)
    return ", ".join(parts) or "-"


_checked: set[str] = set()
"""Hosts already found to be IP literals (a set republished often is checked once)."""


def _stamped(endpoints: Iterable[Endpoint], origin: str, source: str) -> tuple[Endpoint, ...]:
    out = []
    for e in endpoints:
        if not isinstance(e, Endpoint):
            raise DiscoveryError(f"not an Endpoint: {e!r}")
        if e.host not in _checked:
            # A host name here would be resolved by every connect, in a thread.
            try:
                ipaddress.ip_address(e.host)
            except ValueError:
                raise DiscoveryError(f"not an IP address: {e.host!r} (in {e!r})") from None
            if len(_checked) >= 65536:
                _checked.clear()  # addresses churn (pods come and go): keep it bounded
            _checked.add(e.host)
        if not 0 < e.port < 65536 or e.weight < 0:
            raise DiscoveryError(f"port 1..65535 and weight >= 0 needed: {e!r}")
        if e.origin != origin or e.source != source:
            e = dataclasses.replace(e, origin=origin, source=source)
        out.append(e)
    return tuple(out)


class Registry:
    """Every cluster's endpoint set in this process.

    Args:
        clock: wall-clock seconds for "last updated" (tests pass their own).
        meter_provider: where the metrics go (default: the global one).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.clock = clock
        self.config: Config | None = None
        self.clusters: dict[str, _Cluster] = {}
        self.changes = 0
        """Endpoint-set changes since start (all clusters)."""
        self._sets: dict[tuple[str, str, str], EndpointSet] = {}
        """(cluster, origin, source) -> its last published set."""
        self._subscribers: list[Subscriber] = []
        self._follows: dict[Spec, _Task] = {}
        self._watches: dict[str, _Watch] = {}
        self._file_specs: dict[str, tuple[Spec, ...]] = {}
        """Names listed in each watched file, by path."""
        self._warned: set[tuple[str, str]] = set()
        self._nursery: trio.Nursery | None = None
        self._resolver: dns_client.Resolver | None = None
        self._dns: DnsConfig | None = None
        self._health: Callable[[str, Endpoint], str] | None = None
        self._loaded = 0.0
        meter = metrics.get_meter("l4gw.discovery", meter_provider=meter_provider)
        self._m_changes = meter.create_counter(
            "l4gw.discovery.changes", "{change}", "endpoint-set changes, by cluster"
        )
        meter.create_observable_gauge(
            "l4gw.discovery.endpoints",
            [self._observe_endpoints],
            "{endpoint}",
            "endpoints of each cluster, by origin (literal, name, srv, file, plugin)",
        )

    # -- what routing and health read -----------------------------------------------

    def current(self, cluster: ClusterConfig) -> tuple[Endpoint, ...]:
        """The endpoints of ``cluster`` now (see the module rules)."""
        c = self.clusters.get(cluster.name)
        if c is None or c.config != cluster:
            return cluster.endpoints
        return c.current

    def endpoints(self, cluster: str) -> tuple[Endpoint, ...]:
        """The current set of a configured cluster (empty when unknown)."""
        c = self.clusters.get(cluster)
        return c.current if c is not None else ()

    def version(self, cluster: str) -> int:
        """Bumped by each change of ``cluster``'s set."""
        c = self.clusters.get(cluster)
        return c.version if c is not None else 0

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(cluster, endpoints)`` after every change; returns the
        function that unsubscribes. A callback must not block; one that raises
        is logged and the others still run."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def sources(self, cluster: str) -> Iterator[tuple[Key, EndpointSet]]:
        """The (origin, source) and last set of each source ``cluster`` uses, in
        combination order."""
        for key in self._keys(cluster):
            got = self._sets.get((cluster, *key))
            if got is not None:
                yield key, got

    # -- publishing -----------------------------------------------------------------

    def publish(
        self,
        cluster: str,
        endpoints: Iterable[Endpoint],
        *,
        source: str,
        origin: str = "plugin",
    ) -> bool:
        """Replace what ``source`` contributes to ``cluster``'s endpoint set.

        Safe at any time from the trio thread (a plugin's background task, a
        hook). New connections use the new set at once; open ones are never
        touched.

        Args:
            cluster: the cluster's name.
            endpoints: the whole set from this source (empty: it has none now).
            source: who publishes: a plugin's name (the cluster's ``discovery``),
                or for the built-in sources the name, SRV name or file path.
            origin: "plugin" for plugins; "name", "srv", "file" for the built-in ones.

        Returns:
            True when the cluster takes this source's endpoints; False when no
            configured cluster expects them (kept, and used if a reload makes the
            cluster name this source; a warning is logged once).

        Raises:
            DiscoveryError: an item is not an :class:`~gateway.Endpoint`, or the
                origin is unknown.
        """
        if origin not in ORIGINS or origin == "literal":
            raise DiscoveryError(f"unknown origin {origin!r}")
        eps = _stamped(endpoints, origin, source)
        full = (cluster, origin, source)
        old = self._sets.get(full)
        if old is None or old.endpoints != eps:
            self._sets[full] = EndpointSet(eps, self.clock())
        c = self.clusters.get(cluster)
        if c is None or (origin, source) not in self._keys(cluster):
            if origin == "plugin" and (cluster, source) not in self._warned:
                self._warned.add((cluster, source))
                log.warning(
                    "discovery: plugin %s published endpoints for cluster %s, which does not "
                    'name it (discovery = "%s" is needed); kept until it does',
                    source,
                    cluster,
                    source,
                )
            if origin != "plugin":
                self._sets.pop(full, None)
            return False
        self._update(c)
        return True

    # -- configuration --------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take a new configuration: keep the sets of sources that stay, start
        watching new files (read at once) and following new names, stop the rest.
        """
        first = self.config is None
        self.config = config
        self._loaded = self.clock()
        if config.dns != self._dns:
            # A new resolver for every name; the last sets stay until the new answers.
            self._dns = config.dns
            self._resolver = None
            for task in self._follows.values():
                task.scope.cancel()
            self._follows.clear()
        old_clusters = self.clusters
        self.clusters = {}
        for name, cc in config.clusters.items():
            prev = old_clusters.get(name)
            c = _Cluster(cc)
            if prev is not None:
                c.current, c.version, c.updated = prev.current, prev.version, prev.updated
            self.clusters[name] = c
        self._reconcile_watches()
        self._reconcile_follows()
        # Drop what no cluster names (plugins' sets stay: see publish).
        wanted = {(name, *key) for name in self.clusters for key in self._keys(name)}
        for full in list(self._sets):
            if full not in wanted and full[1] != "plugin":
                del self._sets[full]
        for name, c in self.clusters.items():
            self._seed(name)
            self._update(c, quiet=not self._dynamic(name) and (first or name not in old_clusters))

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the follow and watch tasks in ``nursery`` and wait (up to the DNS
        timeout and a second) for every name's first answer, so the listeners
        open with the names resolved."""
        self._nursery = nursery
        self._reconcile_follows()
        self._reconcile_watches()
        if not self._follows:
            return
        timeout = (self._dns.timeout if self._dns else 2.0) + FIRST_ANSWER_GRACE
        with trio.move_on_after(timeout):
            for task in list(self._follows.values()):
                await task.first.wait()
        unresolved = [str(s) for s, t in self._follows.items() if not t.last]
        if unresolved:
            log.warning("discovery: no address yet for %s", ", ".join(unresolved))

    def stop(self) -> None:
        """Cancel every task (the nursery's owner ends them anyway)."""
        for task in (*self._follows.values(), *self._watches.values()):
            task.scope.cancel()
        self._follows.clear()
        self._watches.clear()
        self._nursery = None

    # -- internals --------------------------------------------------------------------

    def _keys(self, cluster: str) -> list[Key]:
        """The sources of ``cluster`` in combination order (literal not included)."""
        c = self.clusters.get(cluster)
        if c is None:
            return []
        cc = c.config
        keys = [spec_key(s) for s in cc.names]
        if cc.endpoints_file:
            keys.append(("file", cc.endpoints_file))
            keys.extend(spec_key(s) for s in self._file_specs.get(cc.endpoints_file, ()))
        if cc.discovery:
            keys.append(("plugin", cc.discovery))
        return keys

    def _dynamic(self, cluster: str) -> bool:
        return bool(self._keys(cluster))

    def _specs_of(self, cluster: str) -> list[Spec]:
        c = self.clusters[cluster]
        specs = list(c.config.names)
        if c.config.endpoints_file:
            specs.extend(self._file_specs.get(c.config.endpoints_file, ()))
        return specs

    def _seed(self, cluster: str) -> None:
        """Give a cluster the last set of each name and file it newly uses."""
        path = self.clusters[cluster].config.endpoints_file
        watch = self._watches.get(path) if path else None
        if (
            path
            and watch is not None
            and watch.last is not None
            and (cluster, "file", path) not in self._sets
        ):
            self._sets[(cluster, "file", path)] = EndpointSet(watch.last, watch.updated)
        for spec in self._specs_of(cluster):
            task = self._follows.get(spec)
            origin, source = spec_key(spec)
            if (
                task is not None
                and task.last is not None
                and (cluster, origin, source) not in self._sets
            ):
                self._sets[(cluster, origin, source)] = EndpointSet(
                    _stamped(task.last, origin, source), task.updated
                )

    def _combine(self, c: _Cluster) -> tuple[Endpoint, ...]:
        out = list(c.config.endpoints)
        seen = {(e.host, e.port) for e in out}
        for _, got in self.sources(c.config.name):
            for e in got.endpoints:
                if (e.host, e.port) not in seen:
                    seen.add((e.host, e.port))
                    out.append(e)
        return tuple(out)

    def _update(self, c: _Cluster, quiet: bool = False) -> None:
        new = self._combine(c)
        old = c.current
        if new == old:
            if any(
                a.origin != b.origin or a.source != b.source for a, b in zip(new, old, strict=True)
            ):
                c.current = new
            return
        c.current = new
        c.version += 1
        c.updated = self.clock()
        if quiet:
            return
        self.changes += 1
        name = c.config.name
        self._m_changes.add(1, {"l4gw.cluster": name})
        added = [e for e in new if e not in old]
        removed = [e for e in old if e not in new]
        log.info(
            "discovery: cluster %s: %d endpoints, added %s, removed %s",
            name,
            len(new),
            _describe(added),
            _describe(removed),
        )
        if not new:
            log.warning("discovery: cluster %s has no endpoints: connections are refused", name)
        for callback in list(self._subscribers):
            try:
                callback(name, new)
            except Exception:
                log.exception("discovery: a subscriber failed on cluster %s", name)

    def _clusters_using(self, key: Key) -> list[str]:
        return [name for name in self.clusters if key in self._keys(name)]

    # -- DNS names -------------------------------------------------------------------

    def _reconcile_follows(self) -> None:
        wanted: list[Spec] = []
        for name in self.clusters:
            for spec in self._specs_of(name):
                if spec not in wanted:
                    wanted.append(spec)
        for spec in list(self._follows):
            if spec not in wanted:
                self._follows.pop(spec).scope.cancel()
        for spec in wanted:
            task = self._follows.get(spec)
            if task is None:
                task = self._follows[spec] = _Task()
            if self._nursery is not None and not task.running:
                task.running = True
                self._nursery.start_soon(self._follow, spec, task)

    def _answer(self, spec: Spec, task: _Task, endpoints: tuple[Endpoint, ...]) -> None:
        origin, source = spec_key(spec)
        task.last = _stamped(endpoints, origin, source)
        task.updated = self.clock()
        task.first.set()
        for cluster in self._clusters_using((origin, source)):
            self.publish(cluster, task.last, origin=origin, source=source)

    async def _follow(self, spec: Spec, task: _Task) -> None:
        with task.scope:
            backoff = 1.0
            while True:
                try:
                    if self._resolver is None:
                        self._resolver = dns_client.Resolver(self._dns or DnsConfig())
                    users = self._clusters_using(spec_key(spec))
                    await dns_client.follow(
                        self._resolver,
                        spec,
                        lambda eps: self._answer(spec, task, tuple(eps)),
                        cluster=",".join(users),
                    )
                except Exception:
                    # A bug in one name's task must not take the gateway down: its
                    # last set stays, and it starts over.
                    log.exception("discovery: following %s failed; retrying", spec)
                    task.first.set()
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)

    # -- endpoint files -----------------------------------------------------------------

    def _reconcile_watches(self) -> None:
        wanted = {c.config.endpoints_file for c in self.clusters.values()} - {None}
        for path in list(self._watches):
            if path not in wanted:
                self._watches.pop(path).scope.cancel()
                self._file_specs.pop(path, None)
        for path in sorted(p for p in wanted if p is not None):
            task = self._watches.get(path)
            if task is None:
                task = self._watches[path] = _Watch(watch=files.Watch(path))
                self._load_file(task, task.watch.poll_now(), initial=True)
            if self._nursery is not None and not task.running:
                task.running = True
                self._nursery.start_soon(self._watch, task)

    def _load_file(self, task: _Watch, result: files.Result | None, initial: bool = False) -> None:
        """Apply a new version of a watched file (None: unchanged)."""
        path = task.watch.path
        if result is None:
            return
        if isinstance(result, files.Problem):
            if result.missing and task.last is None:
                task.last = ()
                log.warning(
                    "discovery: %s: %s; no endpoints from it until it appears", path, result
                )
            else:
                log.error("discovery: %s: %s; keeping the last good endpoints", path, result)
            return
        literals, specs = result
        task.last = _stamped(literals, "file", path)
        task.updated = self.clock()
        self._file_specs[path] = specs
        if initial:
            return  # configure() seeds and combines
        self._reconcile_follows()
        for cluster in self._clusters_using(("file", path)):
            # Names the file no longer lists leave the set, in the same change.
            keys = set(self._keys(cluster))
            for full in [f for f in self._sets if f[0] == cluster and f[1] in ("name", "srv")]:
                if (full[1], full[2]) not in keys:
                    del self._sets[full]
            self._seed(cluster)
            self.publish(cluster, task.last, origin="file", source=path)

    async def _watch(self, task: _Watch) -> None:
        with task.scope:
            while True:
                await trio.sleep(files.POLL_INTERVAL)
                result = await trio.to_thread.run_sync(task.watch.poll_now)
                self._load_file(task, result)

    # -- metrics -------------------------------------------------------------------------

    def _observe_endpoints(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for name, c in list(self.clusters.items()):
            counts = dict.fromkeys(ORIGINS, 0)
            for e in c.current:
                counts[e.origin] = counts.get(e.origin, 0) + 1
            for origin, n in counts.items():
                if n or origin == "literal" or self._dynamic(name):
                    yield metrics.Observation(n, {"l4gw.cluster": name, "l4gw.origin": origin})

    # -- /status ----------------------------------------------------------------------------

    def report_health(self, health: Callable[[str, Endpoint], str] | None) -> None:
        """Who says an endpoint's health in :meth:`status` (the health plugin):
        ``health(cluster, endpoint)`` is "healthy", "unhealthy", "ejected" or
        "unchecked"."""
        self._health = health

    def status(self) -> dict[str, Any]:
        """Per cluster, every endpoint: origin, source, address, weight, priority,
        health ("unchecked" without a health reporter) and when its source last
        changed (ISO 8601, UTC; for literal ones, when the config was loaded)."""
        health = self._health
        out: dict[str, Any] = {}
        for name, c in self.clusters.items():
            when: dict[Key, float] = {key: got.updated for key, got in self.sources(name)}
            when[("literal", "")] = self._loaded
            rows = []
            for e in c.current:
                at = when.get((e.origin, e.source), 0.0)
                rows.append(
                    {
                        "origin": e.origin,
                        "source": e.source,
                        "address": format_address(e.host, e.port),
                        "weight": e.weight,
                        "priority": e.priority,
                        "health": health(name, e) if health else "unchecked",
                        "updated": _iso(at) if at else None,
                    }
                )
            out[name] = {"version": c.version, "endpoints": rows}
        return out


def _iso(t: float) -> str:
    if not math.isfinite(t):
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
