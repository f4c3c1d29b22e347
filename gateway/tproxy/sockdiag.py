"""Which sockets listen on a port, and whether they are transparent (sock_diag netlink).

``l4gw tproxy doctor`` asks this of the kernel rather than of the config: a
TPROXY rule pointing at a port where a *non*-transparent socket listens
delivers nothing, and nothing logs why. ``ss`` shows the same through
INET_DIAG_SOCKOPT (kernel 5.10+); pyroute2 does not decode that attribute,
so the one request needed is built here with ``struct``.

Rules kept: one dump request per family, bounded by the kernel's answer; a
kernel without INET_DIAG_SOCKOPT yields ``transparent=None`` (unknown), never
a guess.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass

from gateway.linux import INET_DIAG_SOCKOPT, NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, TCP_LISTEN

# linux/netlink.h
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")
# linux/inet_diag.h: struct inet_diag_req_v2 (family, protocol, ext, pad, states, sockid)
_REQ = struct.Struct("=BBBxI48x")
# struct inet_diag_msg: family, state, timer, retrans (4 x u8), struct inet_diag_sockid
# (sport, dport as be16 at 4 and 6, src[16] at 8, dst[16], if, cookie[2]: 48 bytes),
# expires, rqueue, wqueue, uid, inode (5 x u32): 72 bytes, then attributes.
_MSG_SIZE = 72
_NLA = struct.Struct("=HH")
# struct inet_diag_sockopt: the first byte's bit fields are recverr, is_icsk, freebind,
# hdrincl, mc_loop, transparent, ... in declaration order: bit 5 on a little-endian ABI.
_TRANSPARENT_BIT = 0x20 if sys.byteorder == "little" else 0x04


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    """A TCP socket in LISTEN state in this network namespace."""

    host: str
    """Bound address (``0.0.0.0`` or ``::`` for a wildcard)."""
    port: int
    transparent: bool | None
    """IP_TRANSPARENT / IPV6_TRANSPARENT set; None when the kernel does not say."""


def listening(family: socket.AddressFamily) -> list[ListeningSocket]:
    """TCP listening sockets of ``family`` in the caller's network namespace.

    Raises:
        OSError: the netlink request failed.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
        flags = _NLM_F_REQUEST | _NLM_F_DUMP
        nl.send(_NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body)
        found: list[ListeningSocket] = []
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    return found
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, offset + _NLMSG.size)
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                if kind == SOCK_DIAG_BY_FAMILY:
                    found.append(_parse(data[offset + _NLMSG.size : offset + length], family))
                offset += (length + 3) & ~3


def _parse(msg: bytes, family: socket.AddressFamily) -> ListeningSocket:
    sport = int.from_bytes(msg[4:6], "big")
    raw = msg[8:24]
    host = str(
        ipaddress.IPv4Address(raw[:4]) if family == socket.AF_INET else ipaddress.IPv6Address(raw)
    )
    transparent: bool | None = None
    offset = _MSG_SIZE
    while offset + _NLA.size <= len(msg):
        length, kind = _NLA.unpack_from(msg, offset)
        if length < _NLA.size:
            break
        if kind & 0x3FFF == INET_DIAG_SOCKOPT and length > _NLA.size:
            transparent = bool(msg[offset + _NLA.size] & _TRANSPARENT_BIT)
        offset += (length + 3) & ~3
    return ListeningSocket(host, sport, transparent)
