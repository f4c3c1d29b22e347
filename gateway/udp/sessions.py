"""UDP sessions as plain values: the session table, its cap and idle expiry, queues, counters.

gateway/udp/listener.py moves the datagrams; the decisions it needs that do not touch
a socket live here, on plain values and an explicit clock, so they are
tested without the network.

Rules kept here:

* **A session is keyed by (client address, original destination).** The key
  is whatever the receive path has at hand without allocating (the client's
  socket address, with the raw ``IP_ORIGDSTADDR`` bytes for a transparent
  listener); :func:`decode_sockaddr` turns the raw bytes into an address only
  when a session opens.
* **The table never holds more than ``cap`` sessions.** Refused sessions stay
  as tombstones (so a client that keeps sending is not re-admitted and re-routed
  for every datagram) and count towards the cap like live ones; a datagram that
  would open one more session is dropped and counted (:attr:`SessionTable.over_cap`).
* **Expiry costs nothing per datagram.** The receive path only stores the
  batch's clock reading in ``session.last``. The table keeps a heap of
  deadlines, at least one entry per session; an entry that comes due is
  checked against ``last + timeout`` and pushed again when the session was
  active meanwhile. A session therefore expires at the first check at or
  after ``last + timeout``: exactly then when the timer wakes on time.
* **Queues are bounded in datagrams and bytes** (:class:`DatagramQueue`): what
  waits for a session's hooks or for a full socket buffer is capped, the rest
  is dropped and counted, as the kernel does for a full receive buffer.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import sys
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Generic, Protocol, TypeVar

from gateway.linux import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR

MAX_DATAGRAM = 65536
"""Receive buffer size: larger than any UDP payload (65,507 B over IPv4, 65,527 B over IPv6)."""
QUEUE_MAX_DATAGRAMS = 64
"""Datagrams one session may hold waiting (for its hooks, or for a full upstream socket)."""
QUEUE_MAX_BYTES = 256 * 1024
"""Bytes one session may hold waiting; at least one datagram of any size always fits."""


class Expiring(Protocol):
    """What the table needs of a session: when it was last active and how long it may idle."""

    last: float
    """Clock reading (the table's clock) of the session's last datagram."""
    timeout: float
    """Idle time after which the session ends, in seconds."""


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Expiring)


class SessionTable(Generic[K, S]):
    """Sessions by key, at most ``cap`` of them, with idle expiry.

    Args:
        cap: most sessions held (the listener's ``max_sessions``); may be
            changed later (a reload), existing sessions stay.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.sessions: dict[K, S] = {}
        """The sessions; the receive path reads this dict directly."""
        self.over_cap = 0
        """Datagrams dropped because they would have opened a session beyond the cap."""
        self._heap: list[tuple[float, int, K, S]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[S]:
        return iter(list(self.sessions.values()))

    def add(self, key: K, session: S) -> bool:
        """Insert a new session (``key`` must be absent); False, counted, when at the cap."""
        if len(self.sessions) >= self.cap:
            self.over_cap += 1
            return False
        self.sessions[key] = session
        self._push(session.last + session.timeout, key, session)
        return True

    def remove(self, key: K, session: S) -> bool:
        """Remove ``session`` if ``key`` still maps to it (its heap entries go stale)."""
        if self.sessions.get(key) is session:
            del self.sessions[key]
            return True
        return False

    def reschedule(self, key: K, session: S) -> None:
        """``session.timeout`` was shortened: check it at its new deadline."""
        self._push(session.last + session.timeout, key, session)

    def expired(self, now: float) -> list[tuple[K, S]]:
        """Remove and return the sessions idle for their whole timeout at ``now``."""
        out: list[tuple[K, S]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key, session = heapq.heappop(heap)
            if self.sessions.get(key) is not session:
                continue  # removed meanwhile: a stale entry
            due = session.last + session.timeout
            if due <= now:
                del self.sessions[key]
                out.append((key, session))
            else:
                self._push(due, key, session)
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`expired` may next return something (None: never, the table is empty)."""
        heap = self._heap
        while heap and self.sessions.get(heap[0][2]) is not heap[0][3]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _push(self, deadline: float, key: K, session: S) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), key, session))


class DatagramQueue:
    """Datagrams waiting to be sent, bounded by count and bytes (see the module rules).

    Args:
        max_datagrams: most datagrams held.
        max_bytes: most payload bytes held; the first datagram always fits.
    """

    __slots__ = ("_items", "bytes", "max_bytes", "max_datagrams")

    def __init__(
        self, max_datagrams: int = QUEUE_MAX_DATAGRAMS, max_bytes: int = QUEUE_MAX_BYTES
    ) -> None:
        self._items: deque[bytes] = deque()
        self.bytes = 0
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._items)

    def push(self, datagram: bytes) -> bool:
        """Queue ``datagram``; False (not queued) when a cap would be exceeded."""
        if self._items and (
            len(self._items) >= self.max_datagrams or self.bytes + len(datagram) > self.max_bytes
        ):
            return False
        self._items.append(datagram)
        self.bytes += len(datagram)
        return True

    def peek(self) -> bytes:
        """The oldest datagram (the queue must not be empty)."""
        return self._items[0]

    def pop(self) -> bytes:
        """Remove and return the oldest datagram (the queue must not be empty)."""
        datagram = self._items.popleft()
        self.bytes -= len(datagram)
        return datagram


@dataclass(slots=True)
class UdpCounters:
    """What one UDP listener dropped or refused, for its log lines (all start at 0)."""

    sessions: int = 0
    """Sessions opened (admitted or not)."""
    over_cap: int = 0
    """Datagrams of new sessions dropped at ``max_sessions``."""
    queue_full: int = 0
    """Datagrams dropped because their session's queue was full."""
    refused: int = 0
    """Datagrams dropped because their session was refused (a tombstone)."""
    oversized: int = 0
    """Datagrams that could not be sent whole (EMSGSIZE: e.g. with the PROXY header)."""
    send_errors: int = 0
    """Datagrams lost to another send error (either direction)."""

    def summary(self) -> str:
        """``name=value`` for every counter, in declaration order."""
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


# --- original destinations ------------------------------------------------------------------


def origdst_from_ancdata(ancdata: Sequence[tuple[int, int, bytes]]) -> bytes | None:
    """The raw ``sockaddr`` of ``IP_ORIGDSTADDR``/``IPV6_ORIGDSTADDR`` among ``recvmsg``'s
    ancillary data, or None when the kernel sent none."""
    for level, kind, data in ancdata:
        if (level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR) or (
            level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR
        ):
            return data
    return None


def decode_sockaddr(raw: bytes) -> tuple[str, int]:
    """``(host, port)`` from a raw ``struct sockaddr_in`` or ``sockaddr_in6``.

    Raises:
        ValueError: not an AF_INET/AF_INET6 address of the right length.
    """
    if len(raw) < 2:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    family = int.from_bytes(raw[:2], sys.byteorder)  # sa_family_t is in host order
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6 and len(raw) >= 24:
        host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        # gateway.flow.unmap's rule, here before the (host, port) tuple is built.
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return host, int.from_bytes(raw[2:4], "big")
    raise ValueError(f"not an IPv4/IPv6 sockaddr: family {family}, {len(raw)} bytes")


def encode_sockaddr(host: str, port: int) -> bytes:
    """The raw ``sockaddr_in``/``sockaddr_in6`` the kernel sends for ``(host, port)``
    (the inverse of :func:`decode_sockaddr`; tests and keys use it)."""
    if ":" in host:
        return (
            socket.AF_INET6.to_bytes(2, sys.byteorder)
            + port.to_bytes(2, "big")
            + bytes(4)
            + socket.inet_pton(socket.AF_INET6, host)
            + bytes(4)
        )
    return (
        socket.AF_INET.to_bytes(2, sys.byteorder)
        + port.to_bytes(2, "big")
        + socket.inet_pton(socket.AF_INET, host)
        + bytes(8)
    )


def pktinfo_destination(raw: bytes) -> tuple[str, bytes]:
    """From ``IP_PKTINFO``/``IPV6_PKTINFO`` ancillary data: the address the datagram was
    sent to (text), and the ``in_pktinfo``/``in6_pktinfo`` to send the replies with so
    that they leave from that address.

    For IPv4 the reply source is ``ipi_spec_dst``, the local address the kernel
    assigns the datagram: the destination itself for unicast, the interface's
    address for a broadcast (which no reply can come from).

    Raises:
        ValueError: neither a 12-byte ``in_pktinfo`` nor a 20-byte ``in6_pktinfo``.
    """
    if len(raw) == 12:  # int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr
        return socket.inet_ntop(socket.AF_INET, raw[8:12]), bytes(4) + raw[4:8] + bytes(4)
    if len(raw) == 20:  # in6_addr ipi6_addr; int ipi6_ifindex
        return socket.inet_ntop(socket.AF_INET6, raw[:16]), raw[:16] + bytes(4)
    raise ValueError(f"not an in_pktinfo or in6_pktinfo: {len(raw)} bytes")
