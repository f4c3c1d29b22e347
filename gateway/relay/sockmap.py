"""The sockmap relay tier: an eBPF sk_skb verdict program splices two TCP sockets.

Userspace never sees the payload; it arms the flow, watches for FIN/RST, bounds the
kernel backlog and tears the flow down. reference/sockmap.md §7 is the procedure and
§8 the rules; the ones this module keeps (numbers are §8's):

- R4/R5  Arm transactionally with two sockhashes: counters, credit and peers first,
  then ``l4gw_targets`` (no program) for both sockets, then ``l4gw_active`` (verdict).
  Only ESTABLISHED sockets; any failure rolls back and raises :class:`ArmError`
  so the caller falls back to splice(2).
- R6     Kick both sockets with ``SO_RCVLOWAT=1`` right after arming, or bytes queued
  before insertion stall until the next segment.
- R7/R8  Never read or write payload on an armed socket, except the bytes the program
  *held* (R12), and then only while the redirect backlog toward the peer is empty; watch
  the sockets in the process's relay poller (gateway/relay/poller.py), each registered
  for ``EPOLLRDHUP`` (ERR/HUP are implicit), adding ``EPOLLIN`` only while a side
  holds bytes (then nothing of it is redirected, so the per-skb wakeups of the
  redirect path still never wake us) and ``EPOLLOUT`` only while held bytes wait for
  room in the peer. No epoll set of its own: a flow in this tier holds its two
  sockets' descriptors and no other, as in the copy tier.
- R9     Half-close X→Y only after ``written(Y) >= received(X) - consumed(X) - 1``
  (the 1 is the FIN); written = ``tcpi_bytes_acked + SIOCOUTQ`` minus its arming
  snapshot. On drain timeout (no progress), abort.
- R10    Tear down drain → ``l4gw_active`` → ``l4gw_targets`` → (caller's) close;
  never remove a socket whose redirect backlog is not empty, unless the flow is being
  reset anyway. A cancelled flow leaves ``l4gw_active`` first and ends with FINs only
  if nothing was in flight, else with RSTs.
- R11    ERR/HUP-with-error or RST on either side: ``SO_LINGER{1,0}`` on both, so the
  caller's close sends RSTs; bytes ACKed into a dead socket are never reported as a
  clean FIN.
- R12    Backpressure by credit, enforced in the program: userspace keeps
  ``l4gw_credit[X].limit`` at ``kernel bytes written to Y + high watermark``; a skb
  that would pass it is held in X's own receive queue (charged to X's receive buffer,
  so the window closes and the sender stops). Once the backlog toward Y has drained,
  userspace reads the held bytes from X, writes them to Y and adds them to
  ``l4gw_credit[X].forwarded``; the program redirects again only when everything held
  has been forwarded, so order is kept. The redirect path has no backpressure of its
  own (1 GiB queued in one measurement); with the credit, what a flow holds in the
  kernel is at most the watermark plus one skb per direction, plus X's receive buffer,
  whatever the watchdog's period. A backlog above the hard cap (a bug) resets the flow.
- R19    The watchdog is woken by what it must act on, not by polling for it: the
  program puts a socket's cookie in the ``l4gw_events`` ring when its hold begins or
  it meets an anomaly, and one task per trio run reads the ring and wakes that flow
  (:meth:`Accelerator._read_events`). So a quiet flow is looked at only every
  ``tick_max`` (its byte counts in the stats are that stale at most) and a thousand
  idle kernel-tier flows cost no CPU to speak of (bench/README.md). The ring is sized
  for every socket to have an event waiting; should one be lost anyway, the hold is
  still enforced in the kernel and the next look sees it.
- R20    A quiet flow settles, and the sweep looks for it: once a look finds a flow quiet
  (nothing moved since the last, nothing in flight, held or half-closed), its watchdog
  stops looking by the period and waits in :attr:`Accelerator._settled`; one task per
  trio run reads every socket's counters with ``bpf_map_lookup_batch`` (1,024 a call)
  each ``tick_max`` and wakes the settled flows whose counters moved
  (:meth:`Accelerator._sweep`). Its idle timeout is still looked at when due, and
  holds, anomalies, FINs and errors wake it as before (R19). So idle flows cost a few
  syscalls per period in all, not two counter reads and a wakeup each; the byte counts
  in the stats are as stale as before (one period at most). Where the kernel has no
  batch lookup, flows look by the period (one warning).
- R13/14 Counters live in the program's ``l4gw_ctrs`` keyed by ``SO_COOKIE``, created
  at arming and deleted at teardown, and are cross-checked with ``TCP_INFO``
  (redirected + forwarded-held = what the destination's TCP accepted).
- R15    Enable only after the canary (:func:`gateway.relay.canary.self_test`) passes
  (the caller decides).
- R16    The program is attached with a bpf_link when the kernel allows (it detaches
  when the process dies); nothing is pinned, so nothing outlives the process.
- R18    Each byte is redirected once: ``tcp_read_skb`` hands the program whole skbs, so
  a retransmission overlapping bytes already received would be sent twice; the
  program tracks the next sequence number per socket and cuts the overlap off
  (bpf/l4gw_sockmap.bpf.c R18). ``trimmed_bytes`` in :meth:`Accelerator.status`
  counts what it cut. The first payload skb after arming takes the number from the
  socket's ``copied_seq``, so what userspace read of it is cut as well: the
  :func:`_flush_partial_skb` below cannot see a segment coalesced into the last skb
  between its ``FIONREAD`` and its read.

Why one module of this size: the rules above hold across arming, the watchdog and
teardown together (the credit written at arming is what the watchdog moves and
teardown checks), so they stay side by side; the canary that proves them on the
host is :mod:`gateway.relay.canary`.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import trio

from gateway import bpfobjects
from gateway.linux import SIOCINQ, SIOCOUTQ, SO_COOKIE, TCP_INFO, ioctl_int
from gateway.relay import libbpf
from gateway.relay.idletimer import QUANTUM
from gateway.relay.libbpf import BpfError
from gateway.relay.poller import READABLE_TO_END, Waiter
from gateway.relay.poller import current as current_poller
from gateway.relay.stats import RelayStats
from gateway.runloop import park

__all__ = [
    "DEFAULT_OBJECT",
    "Accelerator",
    "AcceleratorError",
    "ArmError",
    "FlowReport",
    "L4gwCtr",
    "Limits",
]

log = logging.getLogger("l4gw.relay.sockmap")

DEFAULT_OBJECT: Final = bpfobjects.object_path("l4gw_sockmap.bpf.o")
"""Package data of ``gateway`` (bpf/Makefile builds it there)."""

# net/tcp_states.h: TCP_ESTABLISHED = 1, TCP_CLOSE = 7
TCP_ESTABLISHED: Final = 1
_TCP_STATES: Final = (
    "?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
    "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING",
)  # fmt: skip
# linux/tcp.h struct tcp_info offsets (x86-64 and every LP64 arch): state u8 at 0,
# tcpi_bytes_acked u64 at 120, tcpi_bytes_received u64 at 128.
_TCPI_LEN: Final = 136
_TCPI_BYTES_ACKED: Final = 120
_TCPI_BYTES_RECEIVED: Final = 128

_PROG: Final = "l4gw_verdict"
_TARGETS: Final = "l4gw_targets"
_ACTIVE: Final = "l4gw_active"
_PEERS: Final = "l4gw_peers"
_CTRS: Final = "l4gw_ctrs"
_CREDIT: Final = "l4gw_credit"
_MAPS: Final = (_TARGETS, _ACTIVE, _PEERS, _CTRS, _CREDIT)
_EVENTS: Final = "l4gw_events"
_EVENT_BYTES: Final = 16
"""A ring record: its 8-byte header and a cookie."""
_DRAIN_TICK: Final = 0.05
"""Longest watchdog period while a half-close waits for its direction to drain (R9)."""
_CTR: Final = struct.Struct("=9Q")
"""struct l4gw_ctr as the map stores it: nine u64 in host order (:class:`L4gwCtr`)."""
# struct l4gw_credit { u64 limit, forwarded; }
_CREDIT_VALUE: Final = struct.Struct("=2Q")
# Held bytes are moved in reads of at most this much (bounds what userspace holds),
# and at most _FORWARD_BUDGET per direction before the loop checkpoints.
_FORWARD_CHUNK: Final = 256 << 10
_FORWARD_BUDGET: Final = 4 << 20
_FORWARD_ROUNDS: Final = 4
# What the watchdog always listens for (ERR and HUP are implicit); edge-triggered.
_WATCH: Final = select.EPOLLRDHUP | select.EPOLLET
# TCP states in which the peer's FIN has not come yet: an end event there (a HUP
# without RDHUP or error, which TCP does not send) is no EOF.
_PEER_FIN_PENDING: Final = frozenset({1, 2, 3, 4, 5})  # ESTABLISHED ... FIN_WAIT2
_KEY: Final = struct.Struct("=Q")
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)


class AcceleratorError(RuntimeError):
    """The accelerator cannot be loaded; ``str()`` is a one-line reason."""


class ArmError(RuntimeError):
    """A flow could not be armed; the maps were rolled back and the caller must
    relay this flow another way. ``bytes_moved`` is non-zero only in the rare race
    where one direction was live before the rollback (those bytes were delivered
    in order and are already in the stats)."""

    def __init__(self, reason: str, errno_: int = 0) -> None:
        super().__init__(reason)
        self.errno = errno_


@dataclass(frozen=True)
class Limits:
    """Watchdog settings of the accelerator.

    Attributes:
        high_watermark: Most bytes one direction may have in the redirect path (not
            yet accepted by the destination's TCP); more are held (R12).
        hard_cap: Backlog at which the flow is reset (only a bug gets there).
        tick_min: Watchdog period while a direction is near its watermark or
            holding (seconds).
        tick_max: Longest watchdog period, that of a quiet flow (seconds). Holds and
            anomalies wake the watchdog at once (R19), a FIN or an error through the
            relay poller, and an idle timeout is looked at when it is due, so this
            bounds only how stale a flow's byte counts in the stats get.
        drain_timeout: Seconds without drain progress before a half-close aborts.
    """

    high_watermark: int = 4 << 20
    hard_cap: int = 256 << 20
    tick_min: float = 0.002
    tick_max: float = 2.0
    drain_timeout: float = 10.0


class L4gwCtr(NamedTuple):
    """One socket's ``struct l4gw_ctr`` (bpf/l4gw_sockmap.bpf.c), field for field.

    Attributes:
        bytes: Payload bytes redirected to the peer.
        skbs: Skbs redirected.
        passes: Payload skbs passed for want of a peer entry (an anomaly).
        fails: Redirect helper failures, passed (an anomaly).
        fin: Zero-length skbs seen (dropped: R3).
        held: Payload bytes held for userspace (R12).
        holds: Skbs held.
        trimmed: Bytes cut off the head of skbs that overlapped earlier ones (R18).
        next_seq: R18: bit 32 set once known; low 32 bits: seq of the next new byte.
    """

    bytes: int
    skbs: int
    passes: int
    fails: int
    fin: int
    held: int
    holds: int
    trimmed: int
    next_seq: int


_CTR_ZERO: Final = L4gwCtr(0, 0, 0, 0, 0, 0, 0, 0, 0)


def _u64(n: int) -> bytes:
    return _KEY.pack(n)


def _tcp_info(sock: socket.socket) -> tuple[int, int, int]:
    """(state, bytes_acked, bytes_received)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCPI_LEN)
    acked = int.from_bytes(raw[_TCPI_BYTES_ACKED : _TCPI_BYTES_ACKED + 8], "little")
    received = int.from_bytes(raw[_TCPI_BYTES_RECEIVED : _TCPI_BYTES_RECEIVED + 8], "little")
    return raw[0], acked, received


_CONSISTENT_TRIES: Final = 32


def _sent_total(sock: socket.socket, *, upper: bool) -> int:
    """``bytes_acked + SIOCOUTQ`` (every byte written since the connection began),
    taken at one instant.

    Two syscalls read it, and an ACK landing between them moves bytes from the
    queue to the acked count: the plain sum then falls short by what was acked
    (half a MiB on loopback). The value is consistent when ``bytes_acked`` is
    the same before and after ``SIOCOUTQ``. Should ACKs keep landing, the bound
    the caller can afford: ``upper`` for an arming baseline (a low one would
    overstate what was written since, and half-close early), else the lower.
    """
    _, before, _ = _tcp_info(sock)
    for _ in range(_CONSISTENT_TRIES):
        outq = ioctl_int(sock.fileno(), SIOCOUTQ)
        _, after, _ = _tcp_info(sock)
        if after == before:
            return after + outq
        before = after
    return (after if upper else before) + outq


def _consumed(sock: socket.socket) -> int:
    """``bytes_received - FIONREAD``: the bytes userspace read, at one instant.

    Bytes arriving between the two reads would count as read; when they keep
    arriving, the lower bound (R9 then waits for bytes rather than closing early).
    """
    _, _, before = _tcp_info(sock)
    for _ in range(_CONSISTENT_TRIES):
        inq = ioctl_int(sock.fileno(), SIOCINQ)
        _, _, received = _tcp_info(sock)
        if received == before:
            return received - inq
        before = received
    return before - inq


def _cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _state_name(state: int) -> str:
    return _TCP_STATES[state] if state < len(_TCP_STATES) else str(state)


def _abort(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        pass


@dataclass(slots=True)  # two per flow in the tier, held while it idles
class _Side:
    """One armed socket and its arming snapshots."""

    sock: socket.socket
    name: str  # "client" or "backend"
    cookie: int
    written_base: int  # bytes_acked + SIOCOUTQ at arming
    consumed: int  # bytes_received - FIONREAD at arming: read by userspace before
    eof: bool = False
    shut: bool = False  # we sent SHUT_WR on this socket (its peer's EOF crossed)
    holding: bool = False  # the program holds bytes of this side for userspace
    taken: int = 0  # held bytes read from this socket
    forwarded: int = 0  # held bytes written to the peer (l4gw_credit.forwarded)
    pending: bytes = b""  # taken, not yet forwarded
    blocked: str = ""  # what stopped the last _forward of this side's held bytes
    limit: int = -1  # l4gw_credit.limit last written
    fd: int = -1  # the socket's descriptor, in the relay poller while ``mask``
    mask: int = 0  # the events it is registered for there (0: not any more)
    drain_started: float = 0.0
    drain_progress: int = -1

    def written(self) -> int:
        # Our FIN takes one sequence number in write_seq (SIOCOUTQ) and bytes_acked.
        fin = 1 if self.shut else 0
        return _sent_total(self.sock, upper=False) - self.written_base - fin


@dataclass(slots=True)  # one per flow in the tier, held while it idles
class FlowReport:
    """What one flow did in the kernel tier, filled in while it runs.

    Attributes:
        kernel_bytes: Bytes the program redirected (both directions).
        held_bytes: Bytes the program held and userspace forwarded (R12).
        holds: Times a direction started holding.
        max_backlog: Largest redirect backlog seen in one direction.
    """

    kernel_bytes: int = 0
    held_bytes: int = 0
    holds: int = 0
    max_backlog: int = 0


class _Gone(Exception):
    def __init__(self, side: str) -> None:
        self.side = side


@dataclass
class _Totals:
    flows_now: int = 0
    flows_total: int = 0
    arm_failures: int = 0
    kernel_bytes: int = 0
    held_bytes: int = 0
    holds: int = 0
    aborts: int = 0
    counter_mismatches: int = 0
    max_backlog: int = 0
    trimmed_bytes: int = 0
    looks: int = 0
    events: int = 0
    sweeps: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Accelerator:
    """The loaded sockmap program and its maps; one per process."""

    def __init__(
        self, obj: libbpf.BpfObject, link_fd: int | None, limits: Limits, max_flows: int
    ) -> None:
        self._obj: libbpf.BpfObject | None = obj
        self._link_fd = link_fd
        self.limits = limits
        self._prog_fd = obj.program_fd(_PROG)
        self._fd = {name: obj.map_fd(name) for name in _MAPS}
        self._totals = _Totals()
        self.self_test_result: str | None = "not run"
        self._events = libbpf.U64Ring(obj.map_fd(_EVENTS))
        self._wakes: dict[int, _Wake] = {}
        """Cookie → the watchdog of the flow it belongs to (R19)."""
        self._reader: object | None = None
        """The trio run (its token) whose task reads the events; None: none yet."""
        self._entries = 2 * max_flows
        """Entries of every map (two sockets a flow)."""
        self.full_reason = f"sockmap tier full (sockmap_max_flows = {max_flows})"
        """Why :meth:`room` said no (one string for every flow it refuses)."""
        self._settled: set[_Wake] = set()
        """Watchdogs of quiet flows that wait for the sweep to see their counters move
        (R20)."""
        self._sweeping = True
        """False once a sweep failed (no batch lookup here): flows look by the period."""

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        max_flows: int = 4096,
        limits: Limits | None = None,
    ) -> Accelerator:
        """Load the verdict program and its maps and attach the program.

        Args:
            path: The BPF object; defaults to the one shipped in ``gateway/bpf``.
            max_flows: Capacity; each flow takes two entries in every map.
            limits: Watchdog settings.

        Returns:
            A ready accelerator (run :func:`gateway.relay.canary.self_test` before using it).

        Raises:
            AcceleratorError: With a one-line reason (no privileges, object missing,
                verifier rejection, attach failure).
        """
        try:
            obj = bpfobjects.open_object(Path(path) if path is not None else DEFAULT_OBJECT)
        except bpfobjects.ObjectUnavailable as exc:
            raise AcceleratorError(f"sockmap: {exc}") from exc
        try:
            for name in _MAPS:
                obj.set_max_entries(name, 2 * max_flows)
            obj.set_max_entries(_EVENTS, _ring_bytes(2 * max_flows))
            obj.load()
            prog_fd = obj.program_fd(_PROG)
            link_fd: int | None
            try:
                link_fd = libbpf.link_create(
                    prog_fd, obj.map_fd(_ACTIVE), libbpf.BPF_SK_SKB_STREAM_VERDICT
                )
            except BpfError:
                # Kernels before 6.10 have no sockmap links: attach to the map, which
                # is freed (and the attachment with it) when our fds go.
                link_fd = None
                libbpf.prog_attach(prog_fd, obj.map_fd(_ACTIVE), libbpf.BPF_SK_SKB_STREAM_VERDICT)
        except BpfError as exc:
            obj.close()
            if exc.errno == errno.EPERM:
                raise AcceleratorError(
                    "sockmap: not permitted to load BPF (needs CAP_BPF and CAP_NET_ADMIN)"
                ) from exc
            raise AcceleratorError(f"sockmap: {exc.strerror}") from exc
        return cls(obj, link_fd, limits or Limits(), max_flows)

    def close(self) -> None:
        """Detach the program and free the maps. Armed flows must be finished first."""
        if self._obj is None:
            return
        if self._reader is not None:
            try:
                trio.lowlevel.notify_closing(self._events.fileno())
            except RuntimeError:
                pass  # not in a trio run: the reading task ended with its run
        self._events.close()
        if self._link_fd is not None:
            os.close(self._link_fd)
        else:
            try:
                libbpf.prog_detach(
                    self._prog_fd, self._fd[_ACTIVE], libbpf.BPF_SK_SKB_STREAM_VERDICT
                )
            except BpfError as exc:
                log.warning("sockmap: detach failed: %s", exc.strerror)
        self._obj.close()
        self._obj = None

    def __enter__(self) -> Accelerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- introspection ------------------------------------------------------------

    def map_entries(self) -> dict[str, int]:
        """Number of entries in each map (tests assert these return to zero)."""
        out: dict[str, int] = {}
        for name in _MAPS:
            n, key = 0, None
            while (key := libbpf.map_get_next_key(self._fd[name], key, 8)) is not None:
                n += 1
            out[name] = n
        return out

    def status(self) -> dict[str, Any]:
        """Counters for ``l4gw accel status`` and metrics."""
        t = self._totals
        return {
            "loaded": self._obj is not None,
            "attach": "link" if self._link_fd is not None else "prog_attach",
            "self_test": "passed" if self.self_test_result is None else self.self_test_result,
            "flows_now": t.flows_now,
            "flows_total": t.flows_total,
            "arm_failures": t.arm_failures,
            "kernel_bytes": t.kernel_bytes,
            "held_bytes": t.held_bytes,
            "holds": t.holds,
            "aborts": t.aborts,
            "counter_mismatches": t.counter_mismatches,
            "max_backlog": t.max_backlog,
            "trimmed_bytes": t.trimmed_bytes,
            "watchdog_looks": t.looks,
            "events": t.events,
            "sweeps": t.sweeps,
            "settled_now": len(self._settled),
            "close_reasons": dict(t.reasons),
        }

    def room(self) -> bool:
        """Whether the maps have room for one more flow (``max_flows``); a flow refused
        for want of it is counted in ``arm_failures``, as one the maps refuse is.

        Ask before :meth:`relay`: at the cap its :class:`ArmError` would pass through the
        caller's frame, and an exception keeps each frame it passes materialised for as
        long as the frame lives (about 350 bytes of every flow that goes on elsewhere).
        """
        if self._totals.flows_now * 2 < self._entries:
            return True
        self._totals.arm_failures += 1
        return False

    def note_self_test(self, result: str | None) -> None:
        """Keep the canary's outcome (None: passed) for :meth:`status`, and forget the
        counts of its flow: the canary is not traffic, status() counts real flows only."""
        self._totals = _Totals()
        self.self_test_result = result

    def _ctr(self, cookie: int) -> L4gwCtr:
        """The program's counters of one socket (all 0 once its entry is gone)."""
        raw = libbpf.map_lookup_elem(self._fd[_CTRS], _u64(cookie), _CTR.size)
        if raw is None:
            return _CTR_ZERO
        # _make without its Python-level length check (the struct has the nine fields):
        # this runs twice per watchdog tick.
        return tuple.__new__(L4gwCtr, _CTR.unpack(raw))

    def _credit(self, side: _Side, limit: int) -> None:
        libbpf.map_update_elem(
            self._fd[_CREDIT], _u64(side.cookie), _CREDIT_VALUE.pack(limit, side.forwarded)
        )
        side.limit = limit

    # --- arming ---------------------------------------------------------------------

    def _snapshot(self, sock: socket.socket, name: str) -> _Side:
        state, _, _ = _tcp_info(sock)
        if state != TCP_ESTABLISHED:
            raise ArmError(f"{name} socket is {_state_name(state)}", errno.EOPNOTSUPP)
        # FIONREAD before insertion still reports the TCP queue (after it, psock only).
        return _Side(sock, name, _cookie(sock), _sent_total(sock, upper=True), _consumed(sock))

    def _unarm(self, a: _Side, b: _Side) -> None:
        # Order matters (R10): verdict map first, then the redirect targets.
        for name in (_ACTIVE, _TARGETS, _PEERS, _CREDIT, _CTRS):
            for side in (a, b):
                try:
                    libbpf.map_delete_elem(self._fd[name], _u64(side.cookie))
                except BpfError as exc:
                    log.warning("sockmap: delete %s from %s: %s", side.name, name, exc.strerror)

    def _arm(self, a: _Side, b: _Side, limits: Limits) -> None:
        ctr0 = _CTR.pack(*_CTR_ZERO)
        step = "counters"
        try:
            libbpf.map_update_elem(self._fd[_CTRS], _u64(a.cookie), ctr0, libbpf.BPF_NOEXIST)
            libbpf.map_update_elem(self._fd[_CTRS], _u64(b.cookie), ctr0, libbpf.BPF_NOEXIST)
            step = "credit"
            self._credit(a, limits.high_watermark)
            self._credit(b, limits.high_watermark)
            step = "peers"
            libbpf.map_update_elem(self._fd[_PEERS], _u64(a.cookie), _u64(b.cookie))
            libbpf.map_update_elem(self._fd[_PEERS], _u64(b.cookie), _u64(a.cookie))
            step = "targets"
            for side in (a, b):
                libbpf.map_update_elem(
                    self._fd[_TARGETS], _u64(side.cookie), _u64(side.sock.fileno()),
                    libbpf.BPF_NOEXIST,
                )  # fmt: skip
            step = "active"
            for side in (a, b):
                libbpf.map_update_elem(
                    self._fd[_ACTIVE], _u64(side.cookie), _u64(side.sock.fileno()),
                    libbpf.BPF_NOEXIST,
                )  # fmt: skip
        except BpfError as exc:
            self._unarm(a, b)
            raise ArmError(f"sockmap arming failed at {step}: {exc.strerror}", exc.errno or 0)

    # --- the relay ------------------------------------------------------------------

    async def relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        stats: RelayStats,
        *,
        idle_timeout: float | None,
        on_armed: Callable[[], None] | None = None,
        limits: Limits | None = None,
        report: FlowReport | None = None,
    ) -> str:
        """Splice an established, flushed pair of TCP sockets in the kernel.

        The caller must have written every byte it read from either socket
        (MSG_PEEK is fine) and must close both sockets after this returns.

        Args:
            client: The client-side socket.
            upstream: The upstream socket.
            stats: Incremented by the bytes the kernel moved.
            idle_timeout: Seconds without a byte in either direction; ``None`` for none.
            on_armed: Called once both sockets are in the maps (the flow is in the
                kernel from then on), before the kick.
            limits: This flow's watchdog settings (default: the accelerator's).
            report: Filled in with this flow's kernel-tier numbers as it runs.

        Returns:
            ``"client_eof"``/``"backend_eof"`` (FIN first, both drained and closed
            normally), ``"client_reset"``/``"backend_reset"`` (the other side then
            has ``SO_LINGER{1,0}``), ``"idle_timeout"``, or an abort:
            ``"backlog_cap"``, ``"drain_timeout"``, ``"anomaly"`` (program passed or
            failed to redirect payload). After an abort or reset both sockets have
            ``SO_LINGER{1,0}`` and the caller's close sends RSTs.

        Raises:
            ArmError: The flow could not be armed (not ESTABLISHED, map full, ...);
                nothing was changed and the caller should relay it another way.
        """
        # One frame from arming to the end: a flow idles in it for its life, and a
        # frame more was 400 bytes of each.
        lim = limits or self.limits
        # The sockets are watched by the process's relay poller, registered once, and a
        # long period is kept by its idle timer: a look then costs no cancel scope, no
        # epoll_ctl and no exception (trio's move_on_after and wait_readable did), and
        # the flow needs no descriptor of its own.
        poller = current_poller()
        timer = poller.timer
        a, b, wake = await self._prepare(client, upstream, stats, lim)
        base_from, base_to = stats.bytes_from_client, stats.bytes_to_client
        reason = "cancelled"
        clean = False
        try:  # armed: from here on the finally takes the flow out of the maps again
            readable, writable = wake.readable, wake.writable
            self._start_reader()
            if on_armed is not None:
                on_armed()
            for side in (a, b):
                # R6: bytes queued before insertion get no data_ready of their own.
                side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            # R8: RDHUP only (ERR and HUP are implicit); EPOLLIN/EPOLLOUT only while held
            # bytes are moved. Edge-triggered: a level-triggered RDHUP or HUP would spin
            # after the FIN, and EPOLLIN may be "ready" while the held skb still waits
            # in the psock queue, where recv() cannot see it yet. Registering reports
            # a FIN or an error that came before.
            for i, side in enumerate((a, b)):
                side.fd, side.mask = side.sock.fileno(), _WATCH
                poller.register(side.fd, wake, i, _WATCH)
            # The first looks wait in the idle timer too: a short wait's Cancelled would
            # leave this frame materialised (600 B) for the life of a flow that then
            # idles. What needs a look at once wakes it anyway (a hold, a FIN).
            tick = max(lim.tick_min, QUANTUM)
            worst = 0
            last_total = -1
            last_activity = last_tick = trio.current_time()
            first_eof: str | None = None
            totals = self._totals
            settled = self._settled
            # R20: a quiet flow stops looking by the period (unless its own period is
            # shorter than the sweep's).
            may_settle = lim.tick_max >= self.limits.tick_max
            quiet = False
            while True:
                events = readable[0] or readable[1] or writable[0] or writable[1]
                if wake.due or events or tick <= 0:
                    await trio.lowlevel.checkpoint()
                elif tick >= QUANTUM:
                    if quiet and may_settle and self._sweeping:
                        # Woken by the sweep when its counters move, else looked at
                        # only when its idle timeout is due (R20).
                        wake.total = last_total
                        settled.add(wake)
                        if idle_timeout is not None:
                            timer.set(wake, last_activity + idle_timeout)
                    else:
                        timer.set(wake, timer.now() + tick)
                    wake.task = trio.lowlevel.current_task()
                    await park(wake.abort)
                    timer.cancel(wake)
                    settled.discard(wake)
                    wake.expired = False
                else:  # shorter than the timer's quantum (a busy flow)
                    with trio.move_on_after(tick) as scope:
                        wake.task = trio.lowlevel.current_task()
                        await park(wake.abort)
                    del scope  # not held through the long waits of a quiet flow
                wake.due = False
                totals.looks += 1
                # The poller's flags since the last look (what comes later sets them again).
                end_a, end_b = readable[0] == READABLE_TO_END, readable[1] == READABLE_TO_END
                readable[0] = readable[1] = 0
                writable[0] = writable[1] = False
                for side, end in ((a, end_a), (b, end_b)):
                    if not end or not side.mask:
                        continue  # nothing, or a wakeup for moving held bytes
                    err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    state, _, _ = _tcp_info(side.sock)
                    log.debug("sockmap: %s end event err=%d state=%d", side.name, err, state)
                    # An RST always sets sk_err (EPOLLERR comes with it: no error queue is
                    # used here); a socket may be TCP_CLOSE without one (FIN_WAIT2 →
                    # TIME_WAIT hands over to a timewait sock).
                    if err:
                        # R11: reset the other side too.
                        _abort(a.sock)
                        _abort(b.sock)
                        return (reason := f"{side.name}_reset")
                    if state not in _PEER_FIN_PENDING and not side.eof:
                        side.eof = True
                        side.drain_started = trio.current_time()
                        first_eof = first_eof or f"{side.name}_eof"
                ca, cb = self._ctr(a.cookie), self._ctr(b.cookie)
                if ca.passes or ca.fails or cb.passes or cb.fails:
                    log.error("sockmap: anomaly counters client=%s backend=%s", ca, cb)
                    return (reason := "anomaly")
                now = trio.current_time()
                total = ca.bytes + cb.bytes + ca.held + cb.held
                # A quiet look: nothing moved since the last one, when nothing was in
                # flight, held or half-closed; the counts stand, so it makes no syscall
                # more (an idle flow's looks are most of the tier's CPU).
                draining = (a.eof and not b.shut) or (b.eof and not a.shut)
                quiet = total == last_total and not (worst or a.holding or b.holding or draining)
                again = False
                if not quiet:
                    # Bytes TCP accepted into each side since arming; read once per tick.
                    written_a, written_b = a.written(), b.written()
                    worst = 0
                    # Per direction X → Y: backlog, credit, held bytes, half-close.
                    for x, y, ctr, written_y in ((a, b, ca, written_b), (b, a, cb, written_a)):
                        # Bytes of the redirect path TCP has accepted into Y.
                        kernel_done = written_y - x.forwarded
                        backlog = ctr.bytes - kernel_done
                        worst = max(worst, backlog)
                        if backlog > self._totals.max_backlog:
                            self._totals.max_backlog = backlog
                        if report is not None and backlog > report.max_backlog:
                            report.max_backlog = backlog
                        if backlog > lim.hard_cap:
                            log.warning("sockmap: %s backlog %d over hard cap", x.name, backlog)
                            return (reason := "backlog_cap")
                        if ctr.held > x.forwarded and not x.holding:
                            x.holding = True
                            self._totals.holds += 1
                            if report is not None:
                                report.holds += 1
                        forwarded = x.forwarded
                        limit = kernel_done + lim.high_watermark
                        x.blocked = ""
                        if x.holding and backlog == 0:
                            # R7: the redirect path toward Y is empty, so nothing else
                            # writes to Y while we do.
                            try:
                                self._drain_held(x, y, ctr.held, limit)
                            except _Gone as gone:
                                _abort(a.sock)
                                _abort(b.sock)
                                return (reason := f"{gone.side}_reset")
                            again = again or x.blocked == "budget"
                        if limit != x.limit or x.forwarded != forwarded:
                            self._credit(x, limit)
                        if x.eof and not y.shut:
                            _, _, received = _tcp_info(x.sock)
                            done = written_y + x.forwarded - forwarded
                            # R9: -1 is the FIN, counted in bytes_received.
                            if done >= received - x.consumed - 1:
                                try:
                                    y.sock.shutdown(socket.SHUT_WR)
                                except OSError:
                                    _abort(a.sock)
                                    _abort(b.sock)
                                    return (reason := f"{y.name}_reset")
                                y.shut = True
                            elif done != x.drain_progress:
                                x.drain_progress = done
                                x.drain_started = now
                            elif now - x.drain_started > lim.drain_timeout:
                                return (reason := "drain_timeout")
                    # Not held through the wait (the last direction's counters, ~400 B).
                    del ctr, written_y, kernel_done, backlog, forwarded, limit
                    if a.shut and b.shut:
                        break
                    for x, y in ((a, b), (b, a)):
                        if not x.mask:
                            continue
                        if x.eof and x.shut:
                            # Both halves closed: nothing left to watch on this socket.
                            poller.unregister(x.fd)
                            x.mask = 0
                            continue
                        mask = _WATCH
                        if x.holding and x.blocked != "write":
                            # New held bytes wake us (their data_ready); redirected ones
                            # cannot: while X holds, the program redirects nothing of X.
                            mask |= select.EPOLLIN
                        if y.blocked == "write":
                            mask |= select.EPOLLOUT
                        if mask != x.mask:
                            poller.modify(x.fd, mask)
                            x.mask = mask
                    if report is not None:
                        report.kernel_bytes = ca.bytes + cb.bytes
                        report.held_bytes = a.forwarded + b.forwarded
                    if total != last_total:
                        stats.bytes_from_client = base_from + written_b
                        stats.bytes_to_client = base_to + written_a
                moved = total - last_total if last_total >= 0 else 0
                if total != last_total:
                    last_total = total
                    last_activity = now
                tick = next_tick(lim, tick, moved / max(now - last_tick, 1e-6), worst, a, b)
                if (a.eof and not b.shut) or (b.eof and not a.shut):
                    tick = min(tick, _DRAIN_TICK)  # R9 waits for the drain
                if again:
                    tick = 0.0
                last_tick = now
                if idle_timeout is not None:
                    if now - last_activity >= idle_timeout:
                        if worst or a.holding or b.holding:
                            return (reason := "idle_timeout")  # backlog left: RST, not truncation
                        clean = True
                        return (reason := "idle_timeout")
                    # Looked at when due, whatever the period (never early).
                    tick = min(tick, last_activity + idle_timeout - now)
                del ca, cb  # what a look read is not held through the wait
            assert first_eof is not None
            clean = True
            return (reason := first_eof)
        finally:
            timer.cancel(wake)
            self._settled.discard(wake)
            for side in (a, b):
                if side.mask:
                    poller.unregister(side.fd)
            del self._wakes[a.cookie], self._wakes[b.cookie]
            # Synchronous on purpose: it must run to the end even when cancelled.
            self._finish(a, b, stats, base_from, base_to, clean, reason)

    async def _prepare(
        self, client: socket.socket, upstream: socket.socket, stats: RelayStats, lim: Limits
    ) -> tuple[_Side, _Side, _Wake]:
        """:meth:`relay`'s start: write on what either socket holds of a partial skb (a
        peek may have left one; counted in ``stats``), then put the pair in the maps.
        Raises :class:`ArmError` (nothing changed) where it cannot."""
        if self._obj is None:
            raise ArmError("sockmap accelerator closed")
        try:
            stats.bytes_from_client += await _flush_partial_skb(client, upstream)
            stats.bytes_to_client += await _flush_partial_skb(upstream, client)
        except OSError as exc:
            self._totals.arm_failures += 1
            raise ArmError(
                f"sockmap pre-arming flush failed: {exc.strerror or exc}", exc.errno or 0
            )
        try:
            a = self._snapshot(client, "client")
            b = self._snapshot(upstream, "backend")
            self._arm(a, b, lim)
        except ArmError:
            self._totals.arm_failures += 1
            raise
        except OSError as exc:
            self._totals.arm_failures += 1
            raise ArmError(f"sockmap arming failed: {exc.strerror or exc}", exc.errno or 0)
        self._totals.flows_now += 1
        self._totals.flows_total += 1
        # R19: registered before the first await, so the events' task, which runs only
        # when this one waits, cannot read an event of this flow before it is here.
        wake = self._wakes[a.cookie] = self._wakes[b.cookie] = _Wake()
        return a, b, wake

    def _start_reader(self) -> None:
        """Read the events (R19) in this trio run, unless a task does already."""
        token = trio.lowlevel.current_trio_token()
        if self._reader is not token:
            self._reader = token
            trio.lowlevel.spawn_system_task(self._read_events, name="l4gw sockmap events")
            trio.lowlevel.spawn_system_task(self._sweep, name="l4gw sockmap sweep")

    async def _sweep(self) -> None:
        """R20: every ``tick_max``, read every socket's counters in batches and wake the
        settled flows whose counters moved (or that show an anomaly)."""
        period, settled, wakes = self.limits.tick_max, self._settled, self._wakes
        fd = self._fd[_CTRS]
        fields = len(L4gwCtr._fields)
        nbytes, held = L4gwCtr._fields.index("bytes"), L4gwCtr._fields.index("held")
        passes, fails = L4gwCtr._fields.index("passes"), L4gwCtr._fields.index("fails")
        while self._obj is not None and self._sweeping:
            await trio.sleep(period)
            if not settled or self._obj is None:
                continue
            for wake in settled:
                wake.seen = 0
            try:
                # In chunks, into small buffers, and summed into each flow's watchdog:
                # no allocation that grows with the flows (what it holds is RSS).
                for keys, values in libbpf.map_lookup_batches(fd, 8, _CTR.size):
                    v = values.cast("Q")
                    for i, cookie in enumerate(keys.cast("Q")):
                        owner = wakes.get(cookie)
                        if owner is None or owner.seen < 0 or owner not in settled:
                            continue
                        at = i * fields
                        if v[at + passes] or v[at + fails]:
                            owner.seen = -1  # an anomaly: let the watchdog see it
                        else:
                            owner.seen += v[at + nbytes] + v[at + held]
            except BpfError as exc:
                log.warning(
                    "sockmap: no batch lookup of the counters (%s): quiet flows are "
                    "looked at every %g s instead",
                    exc.strerror, period,
                )  # fmt: skip
                self._sweeping = False
                for wake in list(settled):
                    wake.now()
                return
            self._totals.sweeps += 1
            for wake in list(settled):
                if wake.seen != wake.total:
                    settled.discard(wake)
                    wake.now()
                wake.seen = 0  # the sum is not held till the next sweep

    async def _read_events(self) -> None:
        ring, wakes, totals = self._events, self._wakes, self._totals
        try:
            fd = ring.fileno()
            while True:
                await trio.lowlevel.wait_readable(fd)
                if self._obj is None:
                    return
                for cookie in ring.consume():
                    totals.events += 1
                    wake = wakes.get(cookie)
                    if wake is not None:
                        wake.now()
        except trio.ClosedResourceError:
            return  # the accelerator closed (close() tells this task first)
        except OSError as exc:
            if self._obj is not None:
                log.warning(
                    "sockmap: stopped reading the events ring (%s): holds now wait for "
                    "the watchdog's next look",
                    exc,
                )

    def _drain_held(self, x: _Side, y: _Side, held: int, limit: int) -> None:
        """Forward X's held bytes to Y; end the hold once the program has nothing more.

        The program may hold more bytes while we forward (reading X reopens its
        window), so "all forwarded" is only known after the credit is published and
        the count re-read: from that moment every new skb is redirected again.
        """
        for _ in range(_FORWARD_ROUNDS):
            x.blocked = self._forward(x, y, held)
            if x.blocked:
                return
            self._credit(x, limit)
            held = self._ctr(x.cookie).held
            if held == x.forwarded:
                x.holding = False
                return
        x.blocked = "budget"

    @staticmethod
    def _forward(x: _Side, y: _Side, held: int) -> str:
        """Move held bytes of X to Y until either would block (R12).

        Returns:
            What stopped it: ``"read"`` (X has no held byte readable yet), ``"write"``
            (Y's send buffer is full), ``"budget"`` (moved ``_FORWARD_BUDGET``; more
            may be ready) or ``""`` (everything held so far is forwarded).

        Raises:
            _Gone: X or Y failed (reset): the flow must be aborted.
        """
        budget = _FORWARD_BUDGET
        while True:
            if not x.pending:
                want = held - x.taken
                if want <= 0:
                    return ""
                if budget <= 0:
                    return "budget"
                try:
                    data = x.sock.recv(min(want, _FORWARD_CHUNK), socket.MSG_DONTWAIT)
                except BlockingIOError:
                    # The held skb may still wait in X's psock queue behind bytes
                    # redirected to X; its move to X's queue wakes EPOLLIN.
                    return "read"
                except OSError:
                    raise _Gone(x.name)
                if not data:
                    return "read"
                x.taken += len(data)
                budget -= len(data)
                x.pending = data
            try:
                n = y.sock.send(x.pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return "write"
            except OSError:
                raise _Gone(y.name)
            x.pending = x.pending[n:]
            x.forwarded += n

    def _fold(self, a: _Side, b: _Side, stats: RelayStats, base_from: int, base_to: int) -> None:
        stats.bytes_from_client = base_from + b.written()
        stats.bytes_to_client = base_to + a.written()

    def _quiesce(self, a: _Side, b: _Side) -> bool:
        """Stop the verdicts of a cancelled flow; True when nothing was in flight.

        The caller cancelled (a drain, an admin kill). Removing both sockets from
        ``l4gw_active`` stops new verdicts while ``l4gw_targets`` keeps the psocks,
        so no backlog is destroyed (R10). If then every byte redirected or held has
        reached the other socket, a normal close tells the truth and the flow ends
        with FINs, as in the other tiers; otherwise it is reset.
        """
        for side in (a, b):
            try:
                libbpf.map_delete_elem(self._fd[_ACTIVE], _u64(side.cookie))
            except BpfError:
                return False
        try:
            for x, y in ((a, b), (b, a)):
                ctr = self._ctr(x.cookie)
                if x.pending or ctr.held != x.forwarded or ctr.bytes != y.written() - x.forwarded:
                    return False
        except OSError:
            return False
        return True

    def _finish(
        self,
        a: _Side,
        b: _Side,
        stats: RelayStats,
        base_from: int,
        base_to: int,
        clean: bool,
        reason: str,
    ) -> None:
        t = self._totals
        if not clean and reason == "cancelled":
            clean = self._quiesce(a, b)
        ca, cb = self._ctr(a.cookie), self._ctr(b.cookie)
        try:
            self._fold(a, b, stats, base_from, base_to)
        except OSError:
            pass
        if not clean:
            # Removing a target with a backlog destroys it silently (R10): make sure
            # both peers learn about it through an RST instead.
            _abort(a.sock)
            _abort(b.sock)
            t.aborts += 1
        else:
            # Cross-check (R13): what the program redirected out of X, plus the held
            # bytes userspace forwarded, is what TCP accepted into Y since arming.
            for src, dst, ctr in ((a, b, ca), (b, a, cb)):
                try:
                    written = dst.written()
                except OSError:
                    continue
                if ctr.bytes + src.forwarded != written:
                    t.counter_mismatches += 1
                    log.warning(
                        "sockmap: %s→%s counter %d + forwarded %d != TCP_INFO written %d",
                        src.name, dst.name, ctr.bytes, src.forwarded, written,
                    )  # fmt: skip
        self._unarm(a, b)
        t.kernel_bytes += ca.bytes + cb.bytes
        t.held_bytes += a.forwarded + b.forwarded
        t.trimmed_bytes += ca.trimmed + cb.trimmed
        t.flows_now -= 1
        t.reasons[reason] = t.reasons.get(reason, 0) + 1


class _Wake(Waiter):
    """What wakes one flow's watchdog: its sockets' events (the relay poller: side 0
    the client, 1 the backend), the idle timer (its period), or the events' task
    (R19)."""

    __slots__ = ("due", "expired", "seen", "timer_key", "total")

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        """Its counters' bytes and held bytes at its last look, while it is settled (R20)."""
        self.seen = 0
        """What the sweep summed of them (-1: an anomaly)."""
        self.due = False
        """An event came since the watchdog last looked."""
        self.expired = False
        self.timer_key = 0
        """The idle timer's fields (gateway/relay/idletimer.py ``Timed``)."""

    def now(self) -> None:
        self.due = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)


def _ring_bytes(sockets: int) -> int:
    """The events ring's size: room for an event of every socket at once, a power
    of two of at least a page (the kernel's rule for ring buffers)."""
    return max(os.sysconf("SC_PAGE_SIZE"), 1 << (sockets * _EVENT_BYTES - 1).bit_length())


def next_tick(lim: Limits, tick: float, rate: float, backlog: int, *sides: _Side) -> float:
    """The watchdog's next period: short while the backlog could cross the high
    watermark before the next look, long while the flow is quiet or slow.

    A request/response flow moves little per tick, so it is watched at
    ``tick_max`` (a wakeup per flow per tick is most of the tier's CPU cost, and
    the program wakes the watchdog when a hold begins: R19); a bulk flow at the
    rate that lets it use at most half of the headroom between looks. The period
    grows at most twofold per tick, and shrinks at once.

    Args:
        lim: The watchdog settings.
        tick: The current period.
        rate: Bytes per second redirected (both directions) since the last look.
        backlog: The larger backlog of the two directions.
        sides: The flow's sockets; one whose bytes are held keeps the period short.
    """
    headroom = lim.high_watermark - backlog
    if headroom <= 0 or any(side.holding for side in sides):
        return lim.tick_min
    wanted = headroom / (2 * rate) if rate > 0 else lim.tick_max
    return max(lim.tick_min, min(wanted, tick * 2, lim.tick_max))


async def _flush_partial_skb(src: socket.socket, dst: socket.socket) -> int:
    """Forward in userspace the rest of a partly read receive queue; returns bytes moved.

    ``tcp_read_skb`` hands the verdict whole skbs and ignores ``copied_seq``
    [measured here on 6.18: a 32-byte header read by userspace before arming was
    redirected again]. So when userspace consumed part of the stream and bytes are
    still queued, the head skb may be partly read: read exactly the queued bytes
    (whole skbs from there on) and write them to the peer before arming.
    """
    _, _, received = _tcp_info(src)
    inq = ioctl_int(src.fileno(), SIOCINQ)
    if received - inq <= 0 or inq <= 0:
        return 0
    data = memoryview(src.recv(inq))
    moved = len(data)
    while data:
        try:
            data = data[dst.send(data) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst.fileno())
    return moved
