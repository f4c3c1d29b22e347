"""The kernel shield: the BPF program that drops listed sources' new connections.

This is the kernel half of the shield (bpf/l4gw_shield.bpf.c): load, probe, attach,
the map operations, close. What goes in the map, and for how long, is decided by
:mod:`gateway.shield.table`.

Rules kept here:

* **Loaded once, before the fork.** The supervisor (or the single process) loads it
  and every worker inherits the map fds, so all update the same maps; the maps
  hold everything (entries, deadlines, drops), so no process keeps a copy that
  could differ from another's. The supervisor closes it on exit.
* **Probed before attached.** :meth:`KernelShield.load` runs the program on two
  hand-built SYN frames (``BPF_PROG_TEST_RUN``), one from a listed source and one
  from an unlisted one, through both entry points, and attaches only when both
  verdicts are right; the probe's entry and counts are removed afterwards.
* **One clear line when it cannot load.** :class:`ShieldUnavailable` says why in
  one line (libbpf's own lines, a verifier log among them, go to the debug log);
  the gateway then runs without it and the userspace limiter keeps working.
* **Everything attached is removed on exit.** Links close with :meth:`close` or
  with the process; :func:`recover_stale` removes what only netlink could attach.
  A forked worker closes its copies of the link fds at once (it needs only the
  maps), so the attachment lives exactly as long as the process that loaded it:
  after a kill -9 of the supervisor the program is gone while the workers still
  drain.
* **Privileges.** Loading and attaching need CAP_BPF, CAP_NET_ADMIN and
  CAP_PERFMON (the parser's variable packet offsets); map updates through the
  fds already open need none, so they keep working after the drop to
  ``[gateway] user``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import weakref
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Final

from gateway import bpfobjects
from gateway.relay import libbpf
from gateway.relay.libbpf import BpfError
from gateway.shield import frames
from gateway.shield.attach import Attachment, attach, recover_stale
from gateway.shield.keys import (
    ENTRY,
    KEY,
    IPNet,
    UnshieldableError,
    entry_bytes,
    key_of,
    network_of,
    parse_entry,
    ports_bitmap,
)

__all__ = [
    "DEFAULT_OBJECT",
    "MODES",
    "KernelShield",
    "ShieldUnavailable",
    "UnshieldableError",
    "recover_stale",
]

log = logging.getLogger("l4gw.shield")

DEFAULT_OBJECT: Final = bpfobjects.object_path("l4gw_shield.bpf.o")
"""Package data of ``gateway`` (bpf/Makefile builds it there)."""
MODES: Final = ("auto", "xdp", "tc")

XDP_PROG: Final = "l4gw_shield_xdp"
TC_PROG: Final = "l4gw_shield_tc"
LPM: Final = "l4gw_shield_lpm"
PORTS: Final = "l4gw_shield_prt"
COUNTERS: Final = "l4gw_shield_ctr"
_ZERO: Final = bytes(4)
# linux/bpf.h: enum xdp_action XDP_DROP = 1, XDP_PASS = 2; linux/pkt_cls.h:
# TC_ACT_SHOT = 2, TC_ACT_UNSPEC = -1 (as the u32 test_run reports it)
XDP_DROP: Final = 1
XDP_PASS: Final = 2
TC_ACT_SHOT: Final = 2
TC_ACT_UNSPEC: Final = 0xFFFFFFFF
# The probe's frames: TEST-NET-1 (RFC 5737) never reaches a map in service; port 9
# (discard) is set only while the probe runs.
_PROBE_LISTED: Final = "192.0.2.1"
_PROBE_UNLISTED: Final = "192.0.2.2"
_PROBE_DST: Final = "192.0.2.3"
_PROBE_PORT: Final = 9


class ShieldUnavailable(Exception):
    """The kernel shield cannot load or attach here; ``str()`` is the one line why."""


class KernelShield:
    """The loaded program, its maps and its attachments; one per gateway."""

    def __init__(self, obj: libbpf.BpfObject, max_entries: int) -> None:
        self._obj: libbpf.BpfObject | None = obj
        self.max_entries = max_entries
        self.xdp_fd = obj.program_fd(XDP_PROG)
        self.tc_fd = obj.program_fd(TC_PROG)
        self._lpm = obj.map_fd(LPM)
        self._ports = obj.map_fd(PORTS)
        self._counters = obj.map_fd(COUNTERS)
        self._cpus = libbpf.num_possible_cpus()
        self.attachments: list[Attachment] = []
        self.mode = ""
        """ "xdp" or "tc" (what "auto" picked); ``"eth0=xdp,veth1=tc"`` when the
        interfaces differ; "" while nothing is attached."""

    def _attached(self, a: Attachment) -> None:
        self.attachments.append(a)
        modes = {a.mode for a in self.attachments}
        if len(modes) == 1:
            self.mode = a.mode
        else:
            self.mode = ",".join(f"{x.interface}={x.mode}" for x in self.attachments)

    @classmethod
    def load(
        cls,
        interfaces: Sequence[str],
        mode: str,
        max_entries: int,
        tcp_ports: Collection[int],
        udp_ports: Collection[int],
        *,
        path: str | None = None,
    ) -> KernelShield:
        """Load the program, probe it, set the ports and attach it to ``interfaces``.

        Args:
            interfaces: Where to attach, in this network namespace (none: load and
                probe only, as ``l4gw shield status`` does).
            mode: "auto", "xdp" or "tc" (module :mod:`gateway.shield.attach`).
            max_entries: Capacity of the trie.
            tcp_ports: Destination ports whose SYNs may be dropped.
            udp_ports: Destination ports whose datagrams may be dropped.
            path: The BPF object (default: the one shipped in ``gateway/bpf``).

        Raises:
            ShieldUnavailable: with the one line saying why.
        """
        if mode not in MODES:
            raise ShieldUnavailable(f"shield: unknown mode {mode!r}")
        shield = cls.open(max_entries, path=path)
        try:
            shield.probe()
            shield.set_ports(tcp_ports, udp_ports)
            for interface in interfaces:
                try:
                    a = attach(interface, mode, shield.xdp_fd, shield.tc_fd)
                except OSError as exc:
                    raise ShieldUnavailable(
                        f"shield: cannot attach to {interface}: {_why(exc)}"
                    ) from exc
                shield._attached(a)
                log.info("shield: %s on %s (%s)", a.mode, interface, a.how)
            if shield.attachments:
                ref = weakref.ref(shield)
                os.register_at_fork(after_in_child=lambda: _forked(ref))
        except BaseException:
            shield.close()
            raise
        return shield

    @classmethod
    def open(cls, max_entries: int, *, path: str | None = None) -> KernelShield:
        """Load the object into the kernel; nothing attached, nothing probed.

        Raises:
            ShieldUnavailable: with the one line saying why.
        """
        try:
            # An explicit path that is missing is libbpf's "cannot open": only the
            # shipped object has a remedy to name.
            obj = bpfobjects.open_object(
                Path(path) if path is not None else DEFAULT_OBJECT, check_missing=path is None
            )
        except bpfobjects.ObjectUnavailable as exc:
            raise ShieldUnavailable(f"shield: {exc}") from exc
        with libbpf.captured() as messages:
            try:
                obj.set_max_entries(LPM, max_entries)
                obj.load()
                return cls(obj, max_entries)
            except BpfError as exc:
                obj.close()
                detail = libbpf.summary(messages)
                if exc.errno == errno.EACCES:
                    raise ShieldUnavailable(
                        f"shield: the verifier refused the program ({detail}); without "
                        "CAP_PERFMON it refuses the parser's variable packet offsets"
                    ) from exc
                why = _why(exc) + (f" ({detail})" if detail else "")
                raise ShieldUnavailable(f"shield: {why}") from exc

    def probe(self) -> None:
        """Run both entry points on a SYN from a listed and from an unlisted source.

        Raises:
            ShieldUnavailable: a wrong verdict, or the kernel refused the test run.
        """
        listed = ipaddress.ip_network(_PROBE_LISTED)
        key = key_of(listed)
        try:
            self.set_ports([_PROBE_PORT], [])
            libbpf.map_update_elem(self._lpm, key, entry_bytes(0, 0, KEY.unpack(key)[0]))
            want = {
                (XDP_PROG, True): XDP_DROP,
                (XDP_PROG, False): XDP_PASS,
                (TC_PROG, True): TC_ACT_SHOT,
                (TC_PROG, False): TC_ACT_UNSPEC,
            }
            for (prog, is_listed), expected in want.items():
                src = _PROBE_LISTED if is_listed else _PROBE_UNLISTED
                frame = frames.tcp_frame(src, _PROBE_DST, _PROBE_PORT)
                fd = self.xdp_fd if prog == XDP_PROG else self.tc_fd
                got = libbpf.prog_test_run(fd, frame).retval
                if got != expected:
                    raise ShieldUnavailable(
                        f"shield: self-test: {prog} returned {got} for a SYN from a "
                        f"{'listed' if is_listed else 'unlisted'} source, expected {expected}"
                    )
        except BpfError as exc:
            raise ShieldUnavailable(f"shield: self-test: {_why(exc)}") from exc
        finally:
            try:
                libbpf.map_delete_elem(self._lpm, key)
                self.set_ports([], [])
                self.reset_counters()
            except BpfError as exc:  # pragma: no cover - the maps are ours
                log.warning("shield: cleaning up after the self-test: %s", exc.strerror)

    # --- the map ------------------------------------------------------------------------

    def put(self, net: IPNet, deadline_ns: int) -> None:
        """List ``net`` until ``deadline_ns`` (CLOCK_MONOTONIC, as
        :func:`time.monotonic_ns`; 0 = no expiry). A network already listed keeps
        its drop count (less the drops of the instant between its read and this
        write: the trie has no update of one field).

        Raises:
            UnshieldableError: an IPv6 prefix that would cover every IPv4 source.
            BpfError: ``ENOSPC`` when the map is full.
        """
        key = key_of(net)
        prefixlen = KEY.unpack(key)[0]
        drops = self._exact(key)
        value = entry_bytes(deadline_ns, drops[1] if drops is not None else 0, prefixlen)
        libbpf.map_update_elem(self._lpm, key, value)

    def delete(self, net: IPNet) -> None:
        """Unlist ``net`` (nothing happens when it is not listed)."""
        try:
            key = key_of(net)
        except UnshieldableError:
            return
        libbpf.map_delete_elem(self._lpm, key)

    def drops(self, net: IPNet) -> int:
        """Packets the entry for exactly ``net`` dropped (0 when it is not listed)."""
        try:
            found = self._exact(key_of(net))
        except UnshieldableError:
            return 0
        return 0 if found is None else found[1]

    def deadline(self, net: IPNet) -> int | None:
        """The entry's deadline (0 = none), or None when ``net`` is not listed."""
        try:
            found = self._exact(key_of(net))
        except UnshieldableError:
            return None
        return None if found is None else found[0]

    def entries(self) -> Iterator[tuple[IPNet, int, int]]:
        """Every listed network: (network, deadline_ns, drops)."""
        key: bytes | None = None
        while (key := libbpf.map_get_next_key(self._lpm, key, KEY.size)) is not None:
            found = self._exact(key)
            if found is not None:
                yield network_of(key), found[0], found[1]

    def _exact(self, key: bytes) -> tuple[int, int] | None:
        # A userspace lookup is longest-match: a covering entry answers for an absent
        # one, and its value's prefixlen tells them apart.
        raw = libbpf.map_lookup_elem(self._lpm, key, ENTRY.size)
        if raw is None:
            return None
        deadline, drops, prefixlen = parse_entry(raw)
        if prefixlen != KEY.unpack(key)[0]:
            return None
        return deadline, drops

    def counters(self) -> tuple[int, int]:
        """(passed, dropped) summed over CPUs (bpf/l4gw_shield.bpf.c says what counts)."""
        out = []
        for index in (0, 1):
            raw = libbpf.map_lookup_elem(
                self._counters, index.to_bytes(4, "little"), 8 * self._cpus
            )
            assert raw is not None  # an array has every index
            out.append(sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)))
        return out[0], out[1]

    def reset_counters(self) -> None:
        """Zero the global counters (after the probe)."""
        for index in (0, 1):
            libbpf.map_update_elem(
                self._counters, index.to_bytes(4, "little"), bytes(8 * self._cpus)
            )

    def set_ports(self, tcp_ports: Collection[int], udp_ports: Collection[int]) -> None:
        """The destination ports the program may drop for (on start and reload)."""
        libbpf.map_update_elem(self._ports, _ZERO, ports_bitmap(set(tcp_ports), set(udp_ports)))

    def test_run(self, frame: bytes, *, xdp: bool) -> int:
        """The verdict of one entry point on ``frame`` (tests and the probe)."""
        return libbpf.prog_test_run(self.xdp_fd if xdp else self.tc_fd, frame).retval

    # --- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """Detach everything and free the program and maps (idempotent)."""
        for a in self.attachments:
            a.detach()
        self.attachments.clear()
        self.mode = ""
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    @property
    def closed(self) -> bool:
        return self._obj is None

    def __enter__(self) -> KernelShield:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _forked(ref: weakref.ref[KernelShield]) -> None:
    """In a forked child: the attachments are the parent's; drop our link fds."""
    shield = ref()
    if shield is None:
        return
    for a in shield.attachments:
        if a.link_fd is not None:
            os.close(a.link_fd)
    shield.attachments = []


def _why(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return (
            f"{exc.strerror or exc}: not permitted to load BPF "
            "(needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
        )
    return str(exc.strerror or exc)
