"""Attaching the shield program to interfaces, and removing what a killed gateway left.

Rules kept here (reference/shield.md §0-§2, §6):

* **Links, never pins.** Native XDP goes through an XDP link, tc through a tcx link
  (kernel 6.6+: ``bpf_link_create(prog, ifindex, BPF_TCX_INGRESS)``); both detach
  when their fd closes, so a kill -9 leaves nothing. Only a kernel without tcx
  gets a netlink clsact filter (handle :data:`TC_HANDLE`, priority
  :data:`TC_PRIORITY`); that one outlives the process, and :func:`recover_stale`
  removes it at the next start.
* **mode = "auto"**: veth devices get tcx (native XDP on veth turns the peer's TSO
  off and cut established bulk throughput 4×, §6); any other device tries a native
  XDP link (``XDP_FLAGS_DRV_MODE``: without it the kernel silently falls back to
  generic XDP) and takes tcx when the driver has none. ``"xdp"`` takes native XDP,
  else generic XDP; ``"tc"`` takes tcx.
* **ifindex is per network namespace**: everything here runs in the gateway's.
* **Recovery touches only what is ours**: a netlink XDP program whose name is
  :data:`XDP_PROGRAM` (one held by a link belongs to a live gateway: netlink cannot
  detach it, and it is left alone), our tc filter, and ``l4gw_shield*`` pins.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.linux import ETHTOOL_GDRVINFO, SIOCETHTOOL
from gateway.relay import libbpf
from gateway.relay.libbpf import BpfError

__all__ = [
    "TC_HANDLE",
    "TC_PRIORITY",
    "XDP_PROGRAM",
    "Attachment",
    "attach",
    "driver",
    "recover_stale",
]

log = logging.getLogger("l4gw.shield")

XDP_PROGRAM: Final = "l4gw_shield_xdp"
TC_PROGRAM: Final = "l4gw_shield_tc"
TC_HANDLE: Final = 0x4C34
"""Our clsact filter's handle ("L4"), with :data:`TC_PRIORITY` what recovery looks for."""
TC_PRIORITY: Final = 0x4C34
_BPFFS: Final = Path("/sys/fs/bpf")
# struct ethtool_drvinfo: u32 cmd, char driver[32], ... 196 bytes in all.
_DRVINFO_LEN: Final = 196


@dataclass
class Attachment:
    """The program on one interface.

    Attributes:
        interface: The device's name.
        ifindex: Its index in the gateway's network namespace.
        mode: "xdp" or "tc".
        how: What attached it: "xdp link (native)", "xdp link (generic)", "tcx link"
            or "tc filter (netlink)".
        link_fd: The link's fd (closing it detaches), or None for a netlink filter.
    """

    interface: str
    ifindex: int
    mode: str
    how: str
    link_fd: int | None

    def detach(self) -> None:
        """Remove the program from the interface (idempotent)."""
        if self.link_fd is not None:
            os.close(self.link_fd)
            self.link_fd = None
        elif self.how.startswith("tc filter"):
            self.how = "detached"
            with contextlib.suppress(BpfError):
                libbpf.tc_detach(self.ifindex, TC_HANDLE, TC_PRIORITY)


def driver(interface: str) -> str:
    """The interface's driver name per ethtool ("veth", "virtio_net"); "" when it
    has none (``lo``) or the device does not exist."""
    info = ctypes.create_string_buffer(_DRVINFO_LEN)
    struct.pack_into("=I", info, 0, ETHTOOL_GDRVINFO)
    ifreq = struct.pack("=16sQ", interface.encode()[:15], ctypes.addressof(info)) + bytes(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return ""
    return info.raw[4:36].split(b"\0", 1)[0].decode(errors="replace")


def attach(interface: str, mode: str, xdp_fd: int, tc_fd: int) -> Attachment:
    """Attach the shield to ``interface`` in ``mode`` ("auto", "xdp" or "tc").

    Raises:
        BpfError: nothing could be attached (the message names the interface).
        OSError: no such interface.
    """
    ifindex = socket.if_nametoindex(interface)
    if mode == "auto" and driver(interface) == "veth":
        return _tc(interface, ifindex, tc_fd)
    if mode in ("auto", "xdp"):
        try:
            fd = libbpf.link_create(xdp_fd, ifindex, libbpf.BPF_XDP, libbpf.XDP_FLAGS_DRV_MODE)
            return Attachment(interface, ifindex, "xdp", "xdp link (native)", fd)
        except BpfError as exc:
            if mode == "auto":
                log.info("shield: %s has no native XDP (%s); using tc", interface, exc.strerror)
                return _tc(interface, ifindex, tc_fd)
            log.warning(
                "shield: %s has no native XDP (%s); using generic XDP", interface, exc.strerror
            )
        try:
            fd = libbpf.link_create(xdp_fd, ifindex, libbpf.BPF_XDP, libbpf.XDP_FLAGS_SKB_MODE)
        except BpfError as exc:
            raise BpfError(exc.errno, f"XDP on {interface}: {exc.strerror}") from exc
        return Attachment(interface, ifindex, "xdp", "xdp link (generic)", fd)
    return _tc(interface, ifindex, tc_fd)


def _tc(interface: str, ifindex: int, tc_fd: int) -> Attachment:
    try:
        fd = libbpf.link_create(tc_fd, ifindex, libbpf.BPF_TCX_INGRESS)
        return Attachment(interface, ifindex, "tc", "tcx link", fd)
    except BpfError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise BpfError(exc.errno, f"tcx on {interface}: {exc.strerror}") from exc
    # A kernel before 6.6: no tcx. The netlink filter outlives us; recover_stale.
    try:
        libbpf.tc_hook_create(ifindex)
        libbpf.tc_attach(ifindex, tc_fd, TC_HANDLE, TC_PRIORITY)
    except BpfError as exc:
        raise BpfError(exc.errno, f"tc on {interface}: {exc.strerror}") from exc
    return Attachment(interface, ifindex, "tc", "tc filter (netlink)", None)


def recover_stale(interfaces: Sequence[str]) -> list[str]:
    """Remove what a killed gateway left: our netlink XDP programs and tc filter on
    ``interfaces``, and ``l4gw_shield*`` pins. Returns one line per removal.

    Links need no recovery (the kernel detached them with their last fd). Errors
    are skipped: recovery must never keep the gateway from starting.
    """
    removed: list[str] = []
    for interface in interfaces:
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            continue
        for flags, what in (
            (libbpf.XDP_FLAGS_DRV_MODE, "native"),
            (libbpf.XDP_FLAGS_SKB_MODE, "generic"),
        ):
            try:
                prog_id = libbpf.xdp_query_id(ifindex, flags)
                if not prog_id or libbpf.prog_name(prog_id) != XDP_PROGRAM:
                    continue
                libbpf.xdp_detach(ifindex, flags)
            except BpfError:
                continue  # held by a link (a live gateway), or gone meanwhile
            removed.append(f"{what} XDP program {XDP_PROGRAM} (id {prog_id}) on {interface}")
        try:
            tc_id = libbpf.tc_query(ifindex, TC_HANDLE, TC_PRIORITY)
            if tc_id is not None:
                libbpf.tc_detach(ifindex, TC_HANDLE, TC_PRIORITY)
                removed.append(
                    f"tc ingress filter handle {TC_HANDLE:#x} priority {TC_PRIORITY:#x} "
                    f"(program id {tc_id}) on {interface}"
                )
        except BpfError:
            pass
    with contextlib.suppress(OSError):
        for pin in _BPFFS.glob("l4gw_shield*"):
            with contextlib.suppress(OSError):
                pin.unlink()
                removed.append(f"pin {pin}")
    return removed
