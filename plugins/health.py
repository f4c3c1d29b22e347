"""Endpoint health: active checks in the background, passive outlier ejection.

Active checks (``[cluster.X.health_check]``) probe every endpoint of the
cluster every ``interval``: a TCP connect, then optionally ``send`` and a
reply that must start with ``expect``; for a cluster behind UDP listeners,
a datagram ``send`` answered by one starting with ``expect``. A probe slower
than ``timeout`` fails. ``unhealthy_threshold`` failures in a row mark an
endpoint unhealthy, ``healthy_threshold`` successes in a row bring it back.
The first probe decides the initial state, and start-up waits for it, so the
gateway never opens its listeners believing a dead backend is alive.

Passive ejection (``[cluster.X.outlier]``) watches the core's connect
attempts: ``consecutive_failures`` failures in a row eject the endpoint for
``ejection_time``; it comes back by itself when the time is over (a success
resets the count).

Rules kept here:

* **State is keyed by (cluster, host, port)**: the same address in two
  clusters may be checked differently. A reload keeps the state of every
  endpoint whose check did not change, and restarts the others.
* **Decisions apart from I/O**: :class:`HealthState` and :class:`Ejection`
  are plain state machines; the probes only report "ok" or why not.
* **The connection path only reads**: :meth:`Health.filter` is a dict
  lookup per cluster while everything is healthy.
* **Endpoint sets change at run time** (``gateway.discovery``: DNS, files,
  plugins): checks start for an address that arrives and stop for one that
  leaves; an address that stays keeps its state (health, outlier count and
  ejection), however it arrived. Outlier state of a departed address is dropped.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from opentelemetry import metrics

from gateway import Config, Endpoint, Flow, discovery, hookimpl
from gateway import schema as s

log = logging.getLogger("l4gw.health")

Key = tuple[str, str, int]
"""(cluster, host, port)."""


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """One cluster's active check, as configured.

    Attributes:
        transport: "tcp" or "udp" (from the listeners whose routes use the cluster).
        interval: seconds between the starts of two probes.
        timeout: a probe slower than this fails.
        healthy_threshold: successes in a row that mark an endpoint healthy.
        unhealthy_threshold: failures in a row that mark it unhealthy.
        send: bytes sent after connect (TCP) or as the datagram (UDP).
        expect: the reply must start with these bytes (empty: any reply, or
            for TCP without ``send``, the connect alone).
    """

    transport: str
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int
    send: bytes
    expect: bytes

    @classmethod
    def from_config(cls, table: Mapping[str, Any], transport: str) -> CheckSpec:
        return cls(
            transport=transport,
            interval=table["interval"],
            timeout=table["timeout"],
            healthy_threshold=table["healthy_threshold"],
            unhealthy_threshold=table["unhealthy_threshold"],
            send=table["send"].encode(),
            expect=table["expect"].encode(),
        )


class HealthState:
    """Thresholds over probe results. Unknown (optimistically healthy) until
    the first probe, which decides the state by itself."""

    __slots__ = ("failures", "healthy", "known", "successes")

    def __init__(self) -> None:
        self.healthy = True
        self.known = False
        self.successes = 0
        self.failures = 0

    def observe(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> bool:
        """Record one probe result.

        Returns:
            True when ``healthy`` changed.
        """
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        was = self.healthy
        if not self.known:
            self.known = True
            self.healthy = ok
        elif not was and self.successes >= healthy_threshold:
            self.healthy = True
        elif was and self.failures >= unhealthy_threshold:
            self.healthy = False
        return self.healthy != was


class Ejection:
    """Consecutive connect failures of one endpoint, and its ejection deadline."""

    __slots__ = ("consecutive", "until")

    def __init__(self) -> None:
        self.consecutive = 0
        self.until = 0.0

    def failure(self, now: float, threshold: int, ejection_time: float) -> bool:
        """Count a failed connect.

        Returns:
            True when this failure ejects the endpoint (until ``now + ejection_time``).
        """
        if self.until > now:
            return False
        self.consecutive += 1
        if self.consecutive < threshold:
            return False
        self.consecutive = 0
        self.until = now + ejection_time
        return True

    def success(self) -> None:
        self.consecutive = 0

    def ejected(self, now: float) -> bool:
        return self.until > now


# --- probes -----------------------------------------------------------------


def _why(exc: OSError) -> str:
    # trio's connect errors repeat the address in strerror; the log line has it.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def tcp_probe(host: str, port: int, send: bytes = b"", expect: bytes = b"") -> str | None:
    """Probe a TCP endpoint: connect, optionally send, optionally read a prefix.

    The caller bounds the time with a cancel scope.

    Returns:
        None when healthy, else a short reason for the log.
    """
    sock = trio.socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except OSError as exc:
        sock.close()
        return f"connect: {_why(exc)}"
    async with trio.SocketStream(sock) as stream:
        try:
            if send:
                await stream.send_all(send)
            got = b""
            while len(got) < len(expect):
                chunk = await stream.receive_some(len(expect) - len(got))
                if not chunk:
                    return f"closed after {len(got)} bytes, expected {expect!r}"
                got += chunk
                if not expect.startswith(got):
                    return f"reply {got!r} does not start with {expect!r}"
        except (trio.BrokenResourceError, OSError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
    return None


async def udp_probe(host: str, port: int, send: bytes = b"", expect: bytes = b"") -> str | None:
    """Probe a UDP endpoint: one datagram out, one back that starts with ``expect``.

    A closed port answers with ICMP port unreachable, which the connected
    socket reports as ECONNREFUSED: that fails at once instead of timing out.
    The caller bounds the time with a cancel scope.

    Returns:
        None when healthy, else a short reason for the log.
    """
    with trio.socket.socket(_family(host), socket.SOCK_DGRAM) as sock:
        try:
            await sock.connect((host, port))
            await sock.send(send)
            reply = await sock.recv(65535)
        except OSError as exc:
            return f"udp: {_why(exc)}"
    if not reply.startswith(expect):
        return f"reply {reply[:32]!r} does not start with {expect!r}"
    return None


async def probe(spec: CheckSpec, host: str, port: int) -> str | None:
    """Run one probe of ``spec`` within its timeout; None when healthy."""
    run = udp_probe if spec.transport == "udp" else tcp_probe
    with trio.move_on_after(spec.timeout):
        return await run(host, port, spec.send, spec.expect)
    return f"timed out after {spec.timeout:g}s"


# --- the plugin ---------------------------------------------------------------


@dataclass(eq=False)
class _Checker:
    spec: CheckSpec
    scope: trio.CancelScope
    first: trio.Event


def cluster_transports(config: Config) -> dict[str, str]:
    """Each routed cluster's transport: "udp" when a UDP listener routes to it."""
    protocol = {li.name: li.protocol for li in config.listeners}
    out: dict[str, str] = {}
    for route in config.routes:
        for cluster, _ in route.clusters:
            if protocol.get(route.listener) == "udp" or cluster not in out:
                out[cluster] = protocol.get(route.listener, "tcp")
    return out


class Health:
    """Endpoint availability for the routing plugin, from active checks and
    passive ejection.

    Args:
        clock: monotonic seconds (tests pass their own).
        meter_provider: where the metrics go (default: the global one).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        meter_provider: metrics.MeterProvider | None = None,
        registry: discovery.Registry | None = None,
    ) -> None:
        self.clock = clock
        self.registry = registry if registry is not None else discovery.registry
        self._subscribed = False
        self._specs: dict[str, CheckSpec] = {}
        """Each checked cluster's check, for endpoints that arrive later."""
        self.states: dict[Key, HealthState] = {}
        self.ejections: dict[Key, Ejection] = {}
        self.unhealthy: dict[str, set[tuple[str, int]]] = {}
        """Per cluster, endpoints the active checks mark unhealthy."""
        self.outliers: dict[str, dict[tuple[str, int], Ejection]] = {}
        """Per cluster, endpoints with recent connect failures or an ejection."""
        self.checks = 0
        self.transitions = 0
        self.ejection_count = 0
        self._outlier: dict[str, tuple[int, float]] = {}
        self._wanted: dict[Key, CheckSpec] = {}
        self._checkers: dict[Key, _Checker] = {}
        self._nursery: trio.Nursery | None = None
        meter = metrics.get_meter("l4gw.health", meter_provider=meter_provider)
        self._m_checks = meter.create_counter(
            "l4gw.health.checks", "{probe}", "active health probes, by result"
        )
        self._m_ejections = meter.create_counter(
            "l4gw.outlier.ejections", "{ejection}", "endpoints ejected after connect failures"
        )
        meter.create_observable_gauge(
            "l4gw.endpoint.healthy",
            [self._observe_health],
            "1",
            "1 when the endpoint takes new connections, 0 when unhealthy or ejected",
        )

    # -- what routing reads --------------------------------------------------

    def filter(self, cluster: str, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The endpoints of ``cluster`` that may take new connections."""
        down = self.unhealthy.get(cluster)
        ejected = self.outliers.get(cluster)
        if not down and not ejected:
            return endpoints
        now = self.clock()
        return [
            e
            for e in endpoints
            if not (down and (e.host, e.port) in down)
            and not (ejected and (ej := ejected.get((e.host, e.port))) and ej.ejected(now))
        ]

    def available(self, cluster: str, endpoint: Endpoint) -> bool:
        return bool(self.filter(cluster, (endpoint,)))

    def state_of(self, cluster: str, endpoint: Endpoint) -> str:
        """ "ejected", "unhealthy", "healthy" (checked) or "unchecked" (for /status)."""
        addr = (endpoint.host, endpoint.port)
        ej = self.outliers.get(cluster, {}).get(addr)
        if ej is not None and ej.ejected(self.clock()):
            return "ejected"
        if addr in self.unhealthy.get(cluster, ()):
            return "unhealthy"
        state = self.states.get((cluster, *addr))
        return "healthy" if state is not None and state.known else "unchecked"

    def endpoints_changed(self, cluster: str, endpoints: tuple[Endpoint, ...]) -> None:
        """A cluster's set changed (a registry subscriber): check what arrived,
        stop checking what left; the rest keeps its state."""
        spec = self._specs.get(cluster)
        if spec is not None:
            for key in [k for k in self._wanted if k[0] == cluster]:
                del self._wanted[key]
            for e in endpoints:
                self._wanted[(cluster, e.host, e.port)] = spec
        here = {(e.host, e.port) for e in endpoints}
        per_cluster = self.outliers.get(cluster)
        if per_cluster:
            for addr in [a for a in per_cluster if a not in here]:
                del per_cluster[addr]
        if spec is not None:
            self._reconcile()

    # -- active checks -------------------------------------------------------

    def record(self, key: Key, spec: CheckSpec, error: str | None) -> None:
        """Apply one probe result to ``key``'s state (and log a change)."""
        self.checks += 1
        self._m_checks.add(1, {"l4gw.cluster": key[0], "l4gw.health.result": _result(error)})
        state = self.states.setdefault(key, HealthState())
        if not state.observe(error is None, spec.healthy_threshold, spec.unhealthy_threshold):
            return
        self.transitions += 1
        cluster, host, port = key
        down = self.unhealthy.setdefault(cluster, set())
        where = f"cluster {cluster} endpoint {s.format_address(host, port)}"
        if state.healthy:
            down.discard((host, port))
            log.info("health: %s is healthy", where)
        else:
            down.add((host, port))
            log.warning("health: %s is unhealthy: %s", where, error)

    async def _check_loop(self, key: Key, checker: _Checker) -> None:
        spec = checker.spec
        _, host, port = key
        with checker.scope:
            while True:
                started = trio.current_time()
                self.record(key, spec, await probe(spec, host, port))
                checker.first.set()
                # A little jitter keeps many endpoints from being probed in lockstep.
                await trio.sleep_until(started + spec.interval * random.uniform(0.95, 1.05))

    def _reconcile(self) -> None:
        """Start checkers that are wanted, stop the ones that are not (or changed)."""
        for key, checker in list(self._checkers.items()):
            if self._wanted.get(key) != checker.spec:
                checker.scope.cancel()
                del self._checkers[key]
        for key in list(self.states):
            if key not in self._wanted:
                del self.states[key]
                self.unhealthy.get(key[0], set()).discard((key[1], key[2]))
        if self._nursery is None:
            return
        for key, spec in self._wanted.items():
            if key in self._checkers:
                continue
            old = self.states.get(key)
            if old is not None and not old.healthy:
                # A changed check starts over from "unknown".
                self.unhealthy.get(key[0], set()).discard((key[1], key[2]))
            self.states[key] = HealthState()
            checker = _Checker(spec, trio.CancelScope(), trio.Event())
            self._checkers[key] = checker
            self._nursery.start_soon(self._check_loop, key, checker)

    # -- passive ejection ------------------------------------------------------

    def connect_result(self, cluster: str, endpoint: Endpoint, error: str | None) -> None:
        """Count one connect attempt towards ``cluster``'s outlier rule."""
        rule = self._outlier.get(cluster)
        if rule is None:
            return
        per_cluster = self.outliers.setdefault(cluster, {})
        addr = (endpoint.host, endpoint.port)
        ejection = per_cluster.get(addr)
        if error is None:
            if ejection is not None:
                ejection.success()
                if not ejection.ejected(self.clock()):
                    del per_cluster[addr]
            return
        if ejection is None:
            ejection = per_cluster[addr] = Ejection()
        threshold, ejection_time = rule
        if ejection.failure(self.clock(), threshold, ejection_time):
            self.ejection_count += 1
            self._m_ejections.add(1, {"l4gw.cluster": cluster})
            log.warning(
                "outlier: cluster %s endpoint %s ejected for %gs after %d connect failures (%s)",
                cluster,
                endpoint,
                ejection_time,
                threshold,
                error,
            )

    # -- metrics ---------------------------------------------------------------

    def _observe_health(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        now = self.clock()
        for cluster, host, port in self._wanted:
            down = (host, port) in self.unhealthy.get(cluster, ())
            ej = self.outliers.get(cluster, {}).get((host, port))
            up = not down and not (ej is not None and ej.ejected(now))
            yield metrics.Observation(
                int(up), {"l4gw.cluster": cluster, "l4gw.endpoint": s.format_address(host, port)}
            )

    # -- hooks -------------------------------------------------------------------

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        if not self._subscribed:
            self.registry.subscribe(self.endpoints_changed)
            self.registry.report_health(self.state_of)
            self._subscribed = True
        transports = cluster_transports(config)
        wanted: dict[Key, CheckSpec] = {}
        outlier: dict[str, tuple[int, float]] = {}
        self._specs = {}
        for name, cluster in config.clusters.items():
            if cluster.health_check is not None:
                spec = CheckSpec.from_config(cluster.health_check, transports.get(name, "tcp"))
                self._specs[name] = spec
                for e in self.registry.current(cluster):
                    wanted[(name, e.host, e.port)] = spec
            if cluster.outlier is not None:
                o = cluster.outlier
                outlier[name] = (o["consecutive_failures"], o["ejection_time"])
        self._wanted = wanted
        self._outlier = outlier
        for name in list(self.outliers):
            if name not in outlier:
                del self.outliers[name]
        self._reconcile()
        # Connect results matter to outlier rules only (probes are the checkers' own).
        return None if outlier else _IDLE

    @hookimpl
    async def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._reconcile()
        if not self._checkers:
            return
        # Wait for every first probe: listeners open knowing who is alive.
        longest = max(c.spec.timeout for c in self._checkers.values())
        with trio.move_on_after(longest + 1.0):
            for checker in list(self._checkers.values()):
                await checker.first.wait()
        down = sum(len(v) for v in self.unhealthy.values())
        log.info("health: %d endpoints checked, %d unhealthy", len(self._checkers), down)

    @hookimpl
    def l4gw_connect_attempt(
        self, flow: Flow, endpoint: Endpoint, error: str | None, seconds: float
    ) -> None:
        if flow.cluster is not None:
            self.connect_result(flow.cluster, endpoint, error)


_IDLE = frozenset({"l4gw_connect_attempt"})


def _result(error: str | None) -> str:
    if error is None:
        return "ok"
    return "timeout" if error.startswith("timed out") else "fail"


plugin = Health()
"""The instance the ``health`` entry point registers (routing reads it)."""
