"""Names and SRV names in endpoints, resolved in DNS and followed as their records change.

The client is dnspython's asynchronous resolver on its trio backend (dnspython >= 2.9,
``dnspython[trio]``), chosen over the alternatives because it is the only one that
gives both things this needs: the TTL of every answer (``getaddrinfo`` hides it, so a
name could only be polled at a guessed rate) and no blocking call on the event loop
(``getaddrinfo`` blocks, and trio can only park it in a thread). It speaks UDP with
TCP on truncation, follows CNAMEs, reads resolv.conf, cancels cleanly in a trio
cancel scope, and costs ~220 µs per query on this machine
(shared/reference/trio-libraries.md §2). c-ares bindings (pycares) are callback-based
and tied to asyncio's loop; a home-made DNS client would be a protocol to maintain.

Rules:

1. **Where a name is asked.** A name the hosts file (/etc/hosts) holds, ``localhost``
   and ``*.localhost`` (RFC 6761 §6.3) go to the system resolver
   (:func:`trio.socket.getaddrinfo`, run in a thread by trio), which answers them
   from the file as every other program on the host sees them; dnspython has no
   hosts-file code. So does every name when no DNS server is known (``[dns] servers``
   empty and no ``nameserver`` in /etc/resolv.conf, which is read once per resolver,
   in a thread, with its search list). Every other name goes to the DNS servers
   only: a name they cannot answer is a failure, never a second query that glibc
   would send to servers the operator did not configure.
2. **TTL.** An answer is used until its TTL runs out (``answer.expiration``, the time
   the record may still be cached, not the ``rrset.ttl`` it was sent with), clamped
   into ``[min_ttl, max_ttl]``; for both families, and for SRV with its targets, the
   shortest. A system-resolver answer has no TTL: it is refreshed every
   :data:`SYSTEM_REFRESH` seconds (clamped the same way), so an edit of /etc/hosts
   reaches new connections within that.
3. **Failures.** Each query runs in a cancel scope of ``[dns] timeout``. dnspython's
   exceptions and ``getaddrinfo``'s errors are mapped to :class:`ResolveError` with a
   ``kind`` (:data:`KINDS`). NXDOMAIN and NODATA are answers ("no such name", "no
   such record"); the rest are transient. A transient failure of any part (one
   family, one SRV target) fails the whole resolution, so that :func:`follow` keeps
   the last good set rather than adopting a partial one; a target that does not
   exist is left out of an SRV set.
4. **Endpoints.** Each address becomes an :class:`~gateway.config.Endpoint` of its
   own, with the name's weight (as Envoy's STRICT_DNS does: a name that grows to
   more replicas gets more of the traffic), origin "name" and the name as source.
   SRV targets become endpoints with the record's port, priority and weight; the
   weights of a priority group that are all 0 become 1 each (RFC 2782: weight 0
   everywhere means "no preference"). Sets are sorted, so an answer in a new order
   (dnsmasq rotates them) is no change.
5. **Following** (:func:`follow`): resolve, wait for the TTL, resolve again; the
   callback gets a set only when it differs from the last one delivered. A failure
   after a good answer keeps that answer: one WARNING when the outage starts
   ("keeping N addresses"), one INFO when it ends, a count per failed refresh. A
   name that never resolved is delivered as the empty set once (its cluster has no
   endpoints from it) and retried with a backoff from ``min_ttl`` doubling up to
   ``max(min_ttl, min(max_ttl, 30s))``; the same backoff paces retries during an
   outage, so a resolver that is down gets no storm from every worker and name.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NoReturn, TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rcode
import dns.resolver
import trio
from opentelemetry import metrics

from gateway.config import DnsConfig, Endpoint, NamedEndpoint, SrvEndpoint

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

log = logging.getLogger("l4gw.dns")

Spec = NamedEndpoint | SrvEndpoint
T = TypeVar("T")

KINDS = ("nxdomain", "noanswer", "servfail", "timeout", "refused", "error")
"""What :attr:`ResolveError.kind` may be."""
ANSWERS = frozenset({"nxdomain", "noanswer"})
"""Kinds that are an answer from the authority (the name or record does not exist)."""

HOSTS_PATH = "/etc/hosts"
RESOLV_CONF = "/etc/resolv.conf"
SYSTEM_REFRESH = 5.0
"""Seconds between two system-resolver lookups of a name (it gives no TTL)."""
BACKOFF_CAP = 30.0
"""Longest wait between two attempts at a failing name (before clamping to max_ttl)."""

_FAMILIES = {"any": ("A", "AAAA"), "ipv4": ("A",), "ipv6": ("AAAA",)}
_AF = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


class ResolveError(Exception):
    """A name or SRV name could not be resolved; ``kind`` says how (:data:`KINDS`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class _Addresses:
    hosts: tuple[str, ...]
    ttl: float
    """Seconds the answer stays valid (not yet clamped)."""


class Resolver:
    """Resolves endpoint specs; one per worker process, built from ``[dns]``.

    Args:
        config: ``Config.dns``.
        hosts_path: the hosts file whose names go to the system resolver.
        resolv_conf: read for the DNS servers (and search list) when ``config.servers``
            is empty.
        meter_provider: where the metrics go (default: the global one).
    """

    def __init__(
        self,
        config: DnsConfig,
        *,
        hosts_path: str = HOSTS_PATH,
        resolv_conf: str = RESOLV_CONF,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.config = config
        self.hosts_path = hosts_path
        self._hosts: tuple[tuple[int, int, int], frozenset[str]] | None = None
        r = dns.asyncresolver.Resolver(configure=False)
        self.search = False
        self.resolv_conf = resolv_conf
        self._configured = bool(config.servers)
        self._configuring = trio.Lock()
        if config.servers:
            r.nameservers = [dns.nameserver.Do53Nameserver(h, port=p) for h, p in config.servers]
        # No cache: each name is asked again only when its TTL ran out.
        r.cache = None
        self._resolver = r
        self._set_timeouts()
        self._backend = dns.asyncbackend.get_backend("trio")
        meter = metrics.get_meter("l4gw.dns", meter_provider=meter_provider)
        self._m_resolutions = meter.create_counter(
            "l4gw.dns.resolutions", "{resolution}", "names and SRV names resolved, by result"
        )
        self._m_failures = meter.create_counter(
            "l4gw.dns.failures",
            "{failure}",
            "refreshes of a followed name that failed (its last good set kept), by kind",
        )

    def _set_timeouts(self) -> None:
        r = self._resolver
        # The cancel scope of [dns] timeout decides; within it each server gets two
        # attempts, so one lost UDP datagram is retried instead of failing the query.
        r.lifetime = self.config.timeout + 1.0
        r.timeout = self.config.timeout / (2 * max(1, len(r.nameservers)))

    async def configure(self) -> None:
        """Read the system's DNS servers (and search list) when ``[dns] servers`` is empty.

        Once per resolver (a worker's start, a reload that changes ``[dns]``), in a
        thread: resolv.conf is a file read, not to be done on the event loop. Called
        by the first resolution; call it before :attr:`servers` to see them.
        """
        if self._configured:
            return
        # Every follow task shares this resolver and calls this at once on start.
        async with self._configuring:
            if self._configured:
                return
            r = self._resolver
            try:
                await trio.to_thread.run_sync(r.read_resolv_conf, self.resolv_conf)
                # The system's servers come with its search list: "api" finds
                # "api.default.svc.cluster.local" as it does for every other program.
                self.search = True
            except dns.resolver.NoResolverConfiguration:
                r.nameservers = []
            self._configured = True
            self._set_timeouts()

    def count_failure(self, cluster: str, spec: Spec, kind: str) -> None:
        """Count one failed refresh of a followed name (:func:`follow` does)."""
        attributes = {"l4gw.dns.name": _spec_name(spec), "error.type": kind}
        if cluster:  # a name several clusters share is followed once, for all of them
            attributes["l4gw.cluster"] = cluster
        self._m_failures.add(1, attributes)

    @property
    def servers(self) -> tuple[str, ...]:
        """The DNS servers asked, as "ip:port" (empty: the system resolver only, or
        :meth:`configure` has not read the system's yet)."""
        found = []
        for ns in self._resolver.nameservers:
            # resolv.conf's servers stay plain addresses, on the resolver's port.
            if isinstance(ns, str):
                host, port = ns, self._resolver.port
            elif isinstance(ns, dns.nameserver.Do53Nameserver):
                host, port = ns.address, ns.port
            else:
                found.append(str(ns))
                continue
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return tuple(found)

    # -- one resolution ------------------------------------------------------------

    async def endpoints(self, spec: Spec) -> tuple[tuple[Endpoint, ...], float]:
        """Resolve once.

        Returns:
            The endpoints (origin "name" or "srv", source the name), sorted, and the
            seconds until the answer should be refreshed (its TTL clamped into
            ``[min_ttl, max_ttl]``).

        Raises:
            ResolveError: nothing usable; ``kind`` says why.
        """
        await self.configure()
        try:
            if isinstance(spec, SrvEndpoint):
                found, ttl = await self._srv(spec.srv)
            else:
                addrs = await self._addresses(spec.name)
                found = [
                    Endpoint(h, spec.port, spec.weight, origin="name", source=spec.name)
                    for h in addrs.hosts
                ]
                ttl = addrs.ttl
        except ResolveError as exc:
            self._m_resolutions.add(1, {"l4gw.dns.result": exc.kind})
            raise
        self._m_resolutions.add(1, {"l4gw.dns.result": "ok"})
        return _sorted(found), self.clamp(ttl)

    def clamp(self, ttl: float) -> float:
        return min(max(ttl, self.config.min_ttl), self.config.max_ttl)

    def backoff(self, failures: int) -> float:
        """Seconds before attempt ``failures + 1`` at a failing name (``failures`` >= 1)."""
        cap = max(self.config.min_ttl, min(self.config.max_ttl, BACKOFF_CAP))
        return float(min(cap, self.config.min_ttl * 2 ** min(failures - 1, 16)))

    async def _addresses(self, name: str) -> _Addresses:
        if not self._resolver.nameservers or await self._system_only(name):
            return await self._system(name)
        results = await _gather(
            [partial(self._query, name, t) for t in _FAMILIES[self.config.family]]
        )
        errors = [r for r in results if isinstance(r, ResolveError)]
        transient = [e for e in errors if e.kind not in ANSWERS]
        if transient:
            raise transient[0]
        answers = [r for r in results if not isinstance(r, ResolveError)]
        hosts = tuple(dict.fromkeys(rd.to_text() for a in answers for rd in a))
        if not hosts:
            kinds = {e.kind for e in errors}
            kind = "nxdomain" if "nxdomain" in kinds else "noanswer"
            raise ResolveError(kind, _join(errors) or f"{name}: no address")
        return _Addresses(hosts, min(a.expiration for a in answers) - time.time())

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        try:
            with trio.fail_after(self.config.timeout):
                return await self._resolver.resolve(
                    name, rdtype, search=self.search, backend=self._backend
                )
        except trio.TooSlowError:
            raise ResolveError(
                "timeout", f"{name} {rdtype}: no answer within {self.config.timeout:g}s"
            ) from None
        except dns.exception.DNSException as exc:
            raise _mapped(name, rdtype, exc) from None
        except OSError as exc:
            raise ResolveError("error", f"{name} {rdtype}: {exc.strerror or exc}") from None

    async def _srv(self, name: str) -> tuple[list[Endpoint], float]:
        if not self._resolver.nameservers:
            raise ResolveError("error", f"{name} SRV: no DNS server (SRV needs one)")
        answer = await self._query(name, "SRV")
        records = [
            (rd.priority, rd.weight, rd.port, rd.target.to_text(omit_final_dot=True))
            for rd in answer
        ]
        # RFC 2782: a single record with target "." means the service is not offered.
        records = [r for r in records if r[3] not in ("", ".")]
        if not records:
            raise ResolveError("noanswer", f"{name} SRV: the service is not available here")
        targets = list(dict.fromkeys(r[3] for r in records))
        resolved = await _gather([partial(self._addresses, t) for t in targets])
        results = dict(zip(targets, resolved, strict=True))
        errors = [r for r in results.values() if isinstance(r, ResolveError)]
        transient = [e for e in errors if e.kind not in ANSWERS]
        if transient:
            raise transient[0]
        ttl = answer.expiration - time.time()
        zero_groups = {p for p, *_ in records} - {p for p, w, *_ in records if w}
        found: list[Endpoint] = []
        for priority, weight, port, target in records:
            addrs = results[target]
            if isinstance(addrs, ResolveError):
                continue  # a target that does not exist: left out
            ttl = min(ttl, addrs.ttl)
            w = 1 if priority in zero_groups else weight
            found += [
                Endpoint(h, port, w, priority, origin="srv", source=name) for h in addrs.hosts
            ]
        if not found:
            raise ResolveError("noanswer", f"{name} SRV: no target resolved ({_join(errors)})")
        return found, ttl

    # -- the system resolver ---------------------------------------------------------

    async def _system_only(self, name: str) -> bool:
        name = name.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            return True
        return name in await self._hosts_names()

    async def _hosts_names(self) -> frozenset[str]:
        """The names of the hosts file, read again when it changed (stat in a thread)."""
        try:
            st = await trio.to_thread.run_sync(os.stat, self.hosts_path)
        except OSError:
            return frozenset()
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._hosts is None or self._hosts[0] != key:
            try:
                text = await trio.to_thread.run_sync(_read_text, self.hosts_path)
            except OSError:
                return frozenset()
            self._hosts = (key, hosts_names(text))
        return self._hosts[1]

    async def _system(self, name: str) -> _Addresses:
        try:
            with trio.fail_after(self.config.timeout):
                infos = await trio.socket.getaddrinfo(
                    name, None, _AF[self.config.family], socket.SOCK_STREAM
                )
        except trio.TooSlowError:
            raise ResolveError(
                "timeout",
                f"{name}: the system resolver gave no answer within {self.config.timeout:g}s",
            ) from None
        except socket.gaierror as exc:
            raise ResolveError(_gai_kind(exc.errno), f"{name}: {exc.strerror}") from None
        except OSError as exc:
            raise ResolveError("error", f"{name}: {exc.strerror or exc}") from None
        hosts = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not hosts:
            raise ResolveError("noanswer", f"{name}: no address")
        return _Addresses(hosts, SYSTEM_REFRESH)


async def follow(
    resolver: Resolver,
    spec: Spec,
    on_change: Callable[[tuple[Endpoint, ...]], None],
    *,
    cluster: str = "",
) -> NoReturn:
    """Resolve ``spec`` now and again when each answer's TTL runs out, forever.

    Args:
        resolver: the worker's :class:`Resolver`.
        spec: the name or SRV name.
        on_change: called with the new set whenever it differs from the last one
            delivered (the first success included); a name that never resolved is
            delivered once as ``()``. Called from this task; it must not block.
        cluster: for the log lines and metrics.

    A failure after a good answer keeps the last good set (no callback): one
    WARNING per outage and one INFO when it ends (rule 5 of the module docstring).
    Cancel the task to stop following.
    """
    what = f"cluster {cluster}: {_spec_text(spec)}" if cluster else _spec_text(spec)
    last: tuple[Endpoint, ...] | None = None
    failures = 0
    failed_since = 0.0
    while True:
        try:
            found, delay = await resolver.endpoints(spec)
        except ResolveError as exc:
            failures += 1
            resolver.count_failure(cluster, spec, exc.kind)
            if failures == 1:
                failed_since = time.monotonic()
                if last:
                    log.warning(
                        "dns: %s: resolution failed (%s: %s); keeping %d addresses",
                        what,
                        exc.kind,
                        exc,
                        len(last),
                    )
                else:
                    log.warning(
                        "dns: %s: resolution failed (%s: %s); no endpoints from it until it "
                        "resolves",
                        what,
                        exc.kind,
                        exc,
                    )
            if last is None:
                last = ()
                on_change(())
            delay = resolver.backoff(failures)
        else:
            if failures:
                log.info(
                    "dns: %s: resolves again after %.1fs (%d failed attempts): %s",
                    what,
                    time.monotonic() - failed_since,
                    failures,
                    _addresses_text(found),
                )
            failures = 0
            if found != last:
                last = found
                on_change(found)
        await trio.sleep(delay)


# --- helpers --------------------------------------------------------------------


def hosts_names(text: str) -> frozenset[str]:
    """The names (lower-case) a hosts file holds, aliases included."""
    names: set[str] = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        names.update(f.rstrip(".").lower() for f in fields[1:])
    return frozenset(names)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(1 << 20)


async def _gather(jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T | ResolveError]:
    """Run ``jobs`` concurrently: each one's result or :class:`ResolveError`, in order."""
    results: list[T | ResolveError] = []

    async def run(i: int, job: Callable[[], Awaitable[T]]) -> None:
        try:
            results[i] = await job()
        except ResolveError as exc:
            results[i] = exc

    results = [ResolveError("error", "not run")] * len(jobs)
    if len(jobs) == 1:
        await run(0, jobs[0])
    else:
        async with trio.open_nursery() as nursery:
            for i, job in enumerate(jobs):
                nursery.start_soon(run, i, job)
    return results


def _sorted(found: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    def key(e: Endpoint) -> tuple[int, int, int, int]:
        ip = ipaddress.ip_address(e.host.split("%", 1)[0])
        return (e.priority, ip.version, int(ip), e.port)

    return tuple(sorted(dict.fromkeys(found), key=key))


def _mapped(name: str, rdtype: str, exc: dns.exception.DNSException) -> ResolveError:
    where = f"{name} {rdtype}"
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return ResolveError("nxdomain", f"{where}: no such name (NXDOMAIN)")
    if isinstance(exc, dns.resolver.NoAnswer):
        return ResolveError("noanswer", f"{where}: no such record")
    if isinstance(exc, dns.exception.Timeout):
        return ResolveError("timeout", f"{where}: {exc}")
    if isinstance(exc, dns.resolver.NoNameservers):
        kinds = [_server_kind(e) for e in exc.kwargs.get("errors", ())]
        for kind in ("servfail", "refused", "timeout"):
            if kind in kinds:
                return ResolveError(kind, f"{where}: {exc}")
        return ResolveError("error", f"{where}: {exc}")
    return ResolveError("error", f"{where}: {exc}")


def _server_kind(error: Sequence[object]) -> str:
    """The kind of one ``NoNameservers`` error tuple (server, tcp, port, error, response)."""
    err = error[3] if len(error) > 3 else None
    if err == dns.rcode.to_text(dns.rcode.SERVFAIL):
        return "servfail"
    if err == dns.rcode.to_text(dns.rcode.REFUSED):
        return "refused"
    if isinstance(err, dns.exception.Timeout):
        return "timeout"
    return "error"


def _gai_kind(code: int | None) -> str:
    if code == socket.EAI_NONAME:
        return "nxdomain"
    if code in (getattr(socket, "EAI_NODATA", None), getattr(socket, "EAI_ADDRFAMILY", None)):
        return "noanswer"
    if code == socket.EAI_AGAIN:
        return "timeout"
    if code == socket.EAI_FAIL:
        return "servfail"
    return "error"


def _join(errors: Sequence[ResolveError]) -> str:
    return "; ".join(str(e) for e in errors)


def _spec_name(spec: Spec) -> str:
    return spec.srv if isinstance(spec, SrvEndpoint) else spec.name


def _spec_text(spec: Spec) -> str:
    return f"SRV {spec.srv}" if isinstance(spec, SrvEndpoint) else f"{spec.name}:{spec.port}"


def _addresses_text(found: Sequence[Endpoint]) -> str:
    return ", ".join(str(e) for e in found) or "no address"
