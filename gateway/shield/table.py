"""The shield's policy: what goes in, for how long, and what never does.

Every worker adds and removes through one :class:`Shield`; the entries and
their metadata live in a journal shared by the workers
(:mod:`gateway.shield.journal`), the drops in the kernel map of the BPF
program (:mod:`gateway.shield.kernel`, loaded by the supervisor before the
fork, so every worker holds the same map).

Rules kept here:

* **The never-list is checked on every add** (:mod:`gateway.shield.never`):
  loopback, the gateway's own addresses, ``proxy_protocol_trusted`` and
  ``[shield] never``; an overlapping add raises :class:`ShieldRefused`
  naming what it would block.
* **An automatic verdict expires.** An entry without a TTL must be
  ``static`` (a configured list such as ``[plugin.acl] deny``, or an
  operator's add); a plugin's verdict without one is refused.
* **Bounded.** At most ``max_entries``; a new entry in a full table first
  takes the place of an expired one, then of the one that expires soonest
  (``evict``, counted and logged). Entries without expiry are never evicted:
  a table full of them refuses the add.
* **Once each.** Every add, removal, expiry and eviction is one journal
  record, one log line (by the process that made it) and one count
  (``l4gw.shield.changes``, by action). Re-adding an identical entry (every
  worker applies the acl list) changes nothing and logs nothing.
* **Worker 0 sweeps.** The kernel program stops dropping at an entry's
  deadline by itself; worker 0 (the single process with ``workers = 1``)
  removes expired entries from the map and the journal every
  :data:`SWEEP_INTERVAL` and logs each. The same process reports the
  shield's metrics, which are the gateway's, not a worker's.
* **Without the kernel, nothing is lost.** When the kernel shield is off
  (no ``[shield]``, or it could not load: :attr:`Shield.off_reason` says
  why), the table still keeps every entry, and the acl and ratelimit plugins
  refuse listed clients in ``l4gw_admit`` (:meth:`Shield.lookup`).
* **Deadlines are CLOCK_MONOTONIC nanoseconds**, the clock of the BPF
  program's ``bpf_ktime_get_ns`` (shield.md §3): one clock for the kernel,
  every worker and the journal.

Wiring (gateway/cli/main.py, engineer S1's supervisor part): before the
workers fork, ``install(Shield(kernel=..., off_reason=...))``; each worker's
:class:`gateway.server.Gateway` calls :meth:`Shield.configure` at start and
on reload (before the plugins' ``l4gw_configure``) and runs
:meth:`Shield.sweeper` in worker 0. When nothing was installed,
:func:`current` makes a table of this process alone, kernel off.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from typing import Any, Final, Protocol

import trio

from gateway.shield.journal import COMPACT_AT, Journal
from gateway.shield.never import Network, NeverList, from_config, local_addresses, normalize
from gateway.shield.ports import ports_of

log = logging.getLogger("l4gw.shield")

SWEEP_INTERVAL: Final = 1.0
DEFAULT_MAX_ENTRIES: Final = 65536
ACTIONS: Final = ("add", "remove", "expire", "evict")
_V4_MAPPED: Final = IPv6Network("::ffff:0:0/96")


class KernelMap(Protocol):
    """What the table uses of :class:`gateway.shield.kernel.KernelShield`."""

    mode: str

    def put(self, net: Network, deadline_ns: int) -> None: ...

    def delete(self, net: Network) -> None: ...

    def drops(self, net: Network) -> int: ...

    def counters(self) -> tuple[int, int]: ...

    def set_ports(self, tcp_ports: Collection[int], udp_ports: Collection[int]) -> None: ...


class ShieldRefused(Exception):
    """An add the shield does not make; ``reason`` (and ``str()``) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    """One client address or prefix in the shield."""

    network: Network
    """The address (a /32 or /128) or prefix; IPv4-mapped IPv6 is stored as IPv4."""
    reason: str
    """Why it is there, for people ("rate limited: 20 refusals in 10s")."""
    source: str
    """Who put it there: "acl", "ratelimit", "admin", or another plugin's name."""
    deadline_ns: int
    """CLOCK_MONOTONIC nanoseconds when it expires; 0: never."""
    added: float
    """Wall-clock time (``time.time()``) of the add."""
    by: int = 0
    """The pid of the process that added it."""
    drops: int = 0
    """Packets the kernel dropped for it (0 when the kernel shield is off)."""

    @property
    def static(self) -> bool:
        return self.deadline_ns == 0

    def expired(self, now_ns: int) -> bool:
        return self.deadline_ns != 0 and now_ns >= self.deadline_ns

    def expires_in(self, now_ns: int) -> float | None:
        """Seconds left, or None for an entry without expiry."""
        if not self.deadline_ns:
            return None
        return max(0.0, (self.deadline_ns - now_ns) / 1e9)

    def document(self, now_ns: int) -> dict[str, Any]:
        """As ``/shield`` and ``l4gw shield list`` show it."""
        expires = self.expires_in(now_ns)
        return {
            "cidr": str(self.network),
            "reason": self.reason,
            "source": self.source,
            "drops": self.drops,
            "expires_in": None if expires is None else round(expires, 3),
            "added": self.added,
        }


def _record(entry: Entry) -> dict[str, Any]:
    return {
        "op": "add",
        "net": str(entry.network),
        "reason": entry.reason,
        "source": entry.source,
        "deadline": entry.deadline_ns,
        "added": entry.added,
        "by": entry.by,
    }


def _key(net: Network) -> tuple[int, int, int]:
    bits = net.max_prefixlen
    return net.version, net.prefixlen, int(net.network_address) >> (bits - net.prefixlen)


def _host(address: str | IPv4Address | IPv6Address) -> tuple[int, int, int]:
    """(version, address bits, address as an int); IPv4-mapped IPv6 as IPv4."""
    try:
        addr = ip_address(address)
    except ValueError:
        raise ValueError(f'not an address: "{address}"') from None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return 4, 32, int(addr.ipv4_mapped)
    return addr.version, addr.max_prefixlen, int(addr)


def _ttl_text(seconds: float | None) -> str:
    return "no expiry" if seconds is None else f"ttl {seconds:g}s"


class Shield:
    """The shield's table, shared by the workers forked after it was made.

    Args:
        kernel: the loaded kernel shield, or None.
        off_reason: why there is no kernel shield (one line).
        max_entries: the cap (``[shield] max_entries``; also the map's size).
        journal: the shared journal (default: a new one).
        never: the never-list (default: loopback; :meth:`configure` sets the rest).
        clock_ns: CLOCK_MONOTONIC nanoseconds (tests pass their own).
    """

    def __init__(
        self,
        kernel: KernelMap | None = None,
        off_reason: str = "no [shield] section",
        max_entries: int = DEFAULT_MAX_ENTRIES,
        journal: Journal | None = None,
        never: NeverList | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.kernel = kernel
        self.off_reason = "" if kernel is not None else off_reason
        self.max_entries = max_entries
        self.map_size = max_entries if kernel is not None else None
        """The kernel map's size, fixed at load: a reload cannot raise the cap past it."""
        self.journal = journal if journal is not None else Journal()
        self.never = never if never is not None else NeverList.build()
        self.clock_ns = clock_ns
        self.reporter = True
        """This process sweeps and reports metrics (worker 0)."""
        self._entries: dict[Network, Entry] = {}
        self._lengths: dict[int, Counter[int]] = {4: Counter(), 6: Counter()}
        self._index: dict[tuple[int, int, int], Entry] = {}
        """(version, prefix length, network bits) -> entry: the admit path's lookup."""
        self._order: dict[int, list[int]] = {4: [], 6: []}
        """The prefix lengths present, longest first, per IP version."""
        self._deadlines: list[tuple[int, int, Network]] = []
        """A heap of (deadline, sequence, network) of entries with expiry; items of entries
        removed or renewed since stay until they reach the top (:meth:`_soonest`)."""
        self._seq = itertools.count()
        self.changes: Counter[str] = Counter()
        """Changes by action, gateway-wide (every worker's, from the journal)."""
        self.retired_drops: Counter[str] = Counter()
        """Kernel drops of entries no longer listed, by source."""

    # -- configuration -----------------------------------------------------------------

    def configure(self, config: Any, worker: int = 0) -> None:
        """Apply a (re)loaded config: the never-list (local addresses read again) and the cap."""
        self.never = from_config(config, local_addresses())
        self.reporter = worker == 0
        section = getattr(config, "shield", None)
        cap = getattr(section, "max_entries", None)
        if isinstance(cap, int) and cap > 0:
            self.max_entries = cap if self.map_size is None else min(cap, self.map_size)
        if self.kernel is not None and self.reporter and hasattr(config, "listeners"):
            # The program drops only toward the gateway's ports; they follow a reload.
            self.kernel.set_ports(*ports_of(config))

    # -- reading -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Take in what other processes changed (cheap when nothing did)."""
        with self.journal.thread_lock:
            if self.journal.changed():
                with self.journal.locked(exclusive=False):
                    self._sync()

    def _sync(self) -> None:
        replay, records = self.journal.read_new()
        if replay:
            self._entries.clear()
            self._lengths = {4: Counter(), 6: Counter()}
            self._index.clear()
            self._deadlines.clear()
            self._order = {4: [], 6: []}
            self.changes.clear()
            self.retired_drops.clear()
        for record in records:
            self._apply(record)

    def _apply(self, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "add":
            net = normalize(record["net"])
            entry = Entry(
                net,
                record["reason"],
                record["source"],
                int(record["deadline"]),
                float(record["added"]),
                int(record.get("by", 0)),
            )
            if net not in self._entries:
                self._count_length(net, 1)
            self._entries[net] = entry
            self._index[_key(net)] = entry
            if entry.deadline_ns:
                heapq.heappush(self._deadlines, (entry.deadline_ns, next(self._seq), net))
            self.changes["add"] += 1
        elif op == "del":
            net = normalize(record["net"])
            gone = self._entries.pop(net, None)
            if gone is not None:
                self._count_length(net, -1)
                del self._index[_key(net)]
                self.retired_drops[gone.source] += int(record.get("drops", 0))
            self.changes[record.get("action", "remove")] += 1
        elif op == "totals":
            self.changes.update(record.get("changes", {}))
            self.retired_drops.update(record.get("drops", {}))

    def lookup(self, address: str | IPv4Address | IPv6Address) -> Entry | None:
        """The live entry whose network holds ``address`` (longest prefix), or None."""
        if not self._entries and not self.journal.changed():
            # The usual case, per connection: an empty table nobody changed. No lock:
            # a change another thread is applying right now is as if it came a moment
            # after this connection.
            return None
        with self.journal.thread_lock:  # the /metrics thread may be reading the journal
            self.refresh()
            if not self._entries:
                return None
            version, bits, value = _host(address)
            now = self.clock_ns()
            for length in self._order[version]:
                entry = self._index.get((version, length, value >> (bits - length)))
                if entry is not None and not entry.expired(now):
                    return entry
            return None

    def _count_length(self, net: Network, delta: int) -> None:
        lengths = self._lengths[net.version]
        lengths[net.prefixlen] += delta
        if lengths[net.prefixlen] <= 0:
            del lengths[net.prefixlen]
        self._order[net.version] = sorted(lengths, reverse=True)

    def entries(self) -> list[Entry]:
        """The live entries, with the kernel's drop counts, most recently added first."""
        live = self._live()
        out = [replace(e, drops=self._drops(e.network)) for e in live]
        out.sort(key=lambda e: e.added, reverse=True)
        return out

    def _drops(self, net: Network) -> int:
        if self.kernel is None:
            return 0
        try:
            return self.kernel.drops(net)
        except (OSError, KeyError, ValueError):
            return 0

    def _live(self) -> list[Entry]:
        """The entries not expired (a copy: threads of this process may change the table)."""
        with self.journal.thread_lock:
            self.refresh()
            now = self.clock_ns()
            return [e for e in self._entries.values() if not e.expired(now)]

    def __len__(self) -> int:
        return len(self._live())

    # -- changes -----------------------------------------------------------------------

    def add(
        self,
        network: str | IPv4Address | IPv6Address | Network,
        ttl: float | None,
        reason: str,
        *,
        source: str,
        static: bool = False,
    ) -> Entry:
        """Shield ``network`` (an address or CIDR) for ``ttl`` seconds.

        Adding what is already listed renews it: the later deadline wins, an
        entry without expiry is not given one by an automatic verdict, and a
        static add replaces the entry.

        Args:
            ttl: seconds; None only with ``static``.
            reason: for people (logs, ``/shield``).
            source: who adds it ("ratelimit", "acl", "admin", a plugin's name).
            static: a configured or operator's entry, which may have no TTL.

        Returns:
            The entry as listed now.

        Raises:
            ShieldRefused: on the never-list, no TTL for an automatic verdict,
                a TTL not above 0, the table full of entries without expiry, or
                a prefix the kernel map cannot hold.
            ValueError: not an address or CIDR.
        """
        net = normalize(network)
        if ttl is None and not static:
            raise ShieldRefused(
                f"{net}: an automatic entry needs a TTL (source {source!r} gave none)"
            )
        if ttl is not None and not ttl > 0:
            raise ShieldRefused(f"{net}: the TTL must be above 0s (got {ttl:g})")
        refusal = self.never.refusal(net)
        if refusal is not None:
            raise ShieldRefused(refusal)
        if isinstance(net, IPv6Network) and net.overlaps(_V4_MAPPED):
            # One LPM trie holds both families, IPv4 as ::ffff:a.b.c.d (shield.md §3).
            raise ShieldRefused(
                f"{net} covers the IPv4-mapped range {_V4_MAPPED}: it would block IPv4 clients; "
                "shield the IPv4 prefix instead"
            )
        now = self.clock_ns()
        deadline = 0 if ttl is None else now + int(ttl * 1e9)
        entry = Entry(net, reason, source, deadline, time.time(), os.getpid())
        with self.journal.locked():
            self._sync()
            old = self._entries.get(net)
            if old is not None and not old.expired(now):
                if not static:
                    if old.static:
                        return old
                    if old.deadline_ns >= deadline:
                        return old
                elif (old.reason, old.source, old.deadline_ns) == (reason, source, 0) and not ttl:
                    return old
            records = [] if old is not None else self._make_room(now)
            if self.kernel is not None:
                try:
                    self.kernel.put(net, deadline)
                except ValueError as exc:
                    self.journal.append(*records)
                    self._sync()
                    raise ShieldRefused(f"{net}: {exc}") from None
                except OSError as exc:
                    # Kept in the table: the plugins enforce it in admit.
                    log.error("shield: the kernel map refused %s (%s); enforced in admit", net, exc)
            self.journal.append(*records, _record(entry))
            self._sync()
            self._compact()
        verb = "renewed" if old is not None and not old.expired(now) else "added"
        log.info("shield: %s %s (%s, %s, source %s)", verb, net, reason, _ttl_text(ttl), source)
        return self._entries.get(net, entry)

    def _make_room(self, now: int) -> list[dict[str, Any]]:
        """The records that bring the table under the cap for one more entry: the entries
        that expire soonest go first (expired ones among them), from a heap of deadlines,
        so that a full table under a flood of new clients costs O(log n) per add (hold
        the lock)."""
        # Choose every victim before taking any out: a refusal then changes nothing
        # (neither the kernel map nor the journal).
        victims: list[Entry] = []
        chosen: set[Network] = set()
        while len(self._entries) - len(chosen) >= self.max_entries:
            victim = self._soonest(chosen)
            if victim is None:
                raise ShieldRefused(
                    f"the shield is full: {len(self._entries) - len(chosen)} entries without "
                    f"expiry (max_entries = {self.max_entries})"
                )
            chosen.add(victim.network)
            victims.append(victim)
        records: list[dict[str, Any]] = []
        for victim in victims:
            action = "expire" if victim.expired(now) else "evict"
            record = self._unlist(victim, action)
            records.append(record)
            log.warning(
                "shield: %s %s to make room (max_entries = %d; %s, source %s, %d drops)",
                "evicted" if action == "evict" else "expired",
                victim.network,
                self.max_entries,
                victim.reason,
                victim.source,
                record["drops"],
            )
        return records

    def _soonest(self, skip: set[Network]) -> Entry | None:
        """The listed entry with the earliest deadline not in ``skip`` (None: only entries
        without expiry are left); stale heap items are dropped on the way."""
        heap = self._deadlines
        if len(heap) > 2 * len(self._entries) + 1024:
            live = [e for e in self._entries.values() if not e.static]
            heap[:] = [(e.deadline_ns, next(self._seq), e.network) for e in live]
            heapq.heapify(heap)
        held = []
        found = None
        while heap:
            deadline, _, net = heap[0]
            entry = self._entries.get(net)
            if entry is None or entry.deadline_ns != deadline:
                heapq.heappop(heap)  # removed or renewed since
                continue
            if net in skip:
                held.append(heapq.heappop(heap))
                continue
            found = entry
            break
        for item in held:
            heapq.heappush(heap, item)
        return found

    def _unlist(self, entry: Entry, action: str) -> dict[str, Any]:
        """Take ``entry`` out of the kernel map; its journal record (hold the lock)."""
        drops = self._drops(entry.network)
        if self.kernel is not None:
            try:
                self.kernel.delete(entry.network)
            except (OSError, KeyError) as exc:
                log.debug("shield: kernel delete of %s: %s", entry.network, exc)
        return {"op": "del", "net": str(entry.network), "action": action, "drops": drops}

    def remove(self, network: str | IPv4Address | IPv6Address | Network) -> Entry | None:
        """Take ``network`` (exactly as listed) out of the shield.

        Returns:
            The entry removed (with its drops), or None when it was not listed.

        Raises:
            ValueError: not an address or CIDR.
        """
        net = normalize(network)
        with self.journal.locked():
            self._sync()
            old = self._entries.get(net)
            if old is None:
                return None
            record = self._unlist(old, "remove")
            self.journal.append(record)
            self._sync()
        log.info(
            "shield: removed %s (%s, source %s, %d drops)",
            net,
            old.reason,
            old.source,
            record["drops"],
        )
        return replace(old, drops=int(record["drops"]))

    def sweep(self) -> list[Entry]:
        """Remove the expired entries (worker 0 calls it); each is logged."""
        now = self.clock_ns()
        with self.journal.thread_lock:
            self.refresh()
            if not any(e.expired(now) for e in self._entries.values()):
                return []
        gone: list[Entry] = []
        with self.journal.locked():
            self._sync()
            records = []
            for entry in [e for e in self._entries.values() if e.expired(now)]:
                record = self._unlist(entry, "expire")
                records.append(record)
                gone.append(replace(entry, drops=int(record["drops"])))
            self.journal.append(*records)
            self._sync()
        for entry in gone:
            log.info(
                "shield: expired %s (%s, source %s, %d drops)",
                entry.network,
                entry.reason,
                entry.source,
                entry.drops,
            )
        return gone

    async def sweeper(self) -> None:
        """Sweep every :data:`SWEEP_INTERVAL` until cancelled (worker 0)."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            try:
                self.sweep()
            except Exception:
                log.exception("shield: sweep failed")

    def _compact(self) -> None:
        """Rewrite the journal as a snapshot when history outweighs it (hold the lock)."""
        size = self.journal.size()
        # A snapshot record is about 200 bytes: compact once history is 3/4 of the journal.
        if size < COMPACT_AT or size < 4 * 200 * (len(self._entries) + 1):
            return
        changes = dict(self.changes)
        # The snapshot's add records are not changes: the totals already count them.
        changes["add"] = self.changes["add"] - len(self._entries)
        totals = {"op": "totals", "changes": changes, "drops": dict(self.retired_drops)}
        self.journal.rewrite([totals, *(_record(e) for e in self._entries.values())])
        self._sync()

    # -- what operators see --------------------------------------------------------------

    def counters(self) -> tuple[int, int] | None:
        """The kernel program's (passed, dropped), or None without it."""
        if self.kernel is None:
            return None
        try:
            return self.kernel.counters()
        except OSError:
            return None

    def status_changes(self) -> dict[str, int]:
        """Changes by action, gateway-wide, as of now."""
        with self.journal.thread_lock:
            self.refresh()
            return {a: self.changes[a] for a in ACTIONS}

    def drops_by_source(self) -> dict[str, int]:
        """Kernel drops by the source of the entry that caused them, listed or gone."""
        with self.journal.thread_lock:
            self.refresh()
            out = Counter(self.retired_drops)
            listed = list(self._entries.values())
        for entry in listed:
            out[entry.source] += self._drops(entry.network)
        return dict(out)

    def status(self) -> dict[str, Any]:
        """The ``shield`` part of ``/status``."""
        live = len(self._live())
        changes = self.status_changes()
        kernel: dict[str, Any] = {"enabled": self.kernel is not None}
        if self.kernel is None:
            kernel["why_off"] = self.off_reason
            kernel["enforced_by"] = "l4gw_admit (acl, ratelimit plugins)"
        else:
            kernel["mode"] = self.kernel.mode
            packets = self.counters()
            if packets is not None:
                kernel["packets"] = {"passed": packets[0], "dropped": packets[1]}
        return {
            "kernel": kernel,
            "entries": live,
            "max_entries": self.max_entries,
            "changes": changes,
            "drops_by_source": self.drops_by_source(),
            "never": [f"{n.network} ({n.why})" for n in self.never.entries],
        }

    def close(self) -> None:
        self.journal.close()


# --- the process's table -----------------------------------------------------------------

_current: Shield | None = None


def install(shield: Shield | None) -> None:
    """Make ``shield`` the table of this process (and of the workers it forks)."""
    global _current
    _current = shield


def current() -> Shield:
    """The table of this process; one of its own (kernel off) when none was installed."""
    global _current
    if _current is None:
        _current = Shield(off_reason="not loaded in this process")
    return _current


def installed() -> Shield | None:
    """The installed table, without making one."""
    return _current


def lookup(address: str | IPv4Address | IPv6Address) -> Entry | None:
    """``current().lookup(address)``, with the installed table read in place: the acl
    plugin asks per connection, and ``current()`` is a call."""
    shield = _current
    return (current() if shield is None else shield).lookup(address)
