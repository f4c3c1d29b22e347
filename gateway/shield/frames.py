"""Hand-built Ethernet frames for ``BPF_PROG_TEST_RUN``: the start-up probe and the tests.

The shield never reads checksums (veth skbs are often CHECKSUM_PARTIAL, and a drop
needs none: shield.md §6), so none are computed here.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Final

__all__ = [
    "ACK",
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "IPPROTO_TCP",
    "IPPROTO_UDP",
    "SYN",
    "ethernet",
    "ipv4",
    "ipv6",
    "ipv6_ext",
    "tcp",
    "tcp_frame",
    "udp",
]

# linux/if_ether.h
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8
# linux/in.h
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
# linux/tcp.h flag bits of byte 13
SYN: Final = 0x02
ACK: Final = 0x10

_MACS: Final = bytes.fromhex("020000000001020000000002")  # dst, src


def ethernet(ethertype: int, payload: bytes, vlans: Sequence[int] = ()) -> bytes:
    """An Ethernet frame, with 802.1Q tags (outermost first) when ``vlans`` is set."""
    tags = b""
    for i, vid in enumerate(vlans):
        tpid = ETH_P_8021AD if i == 0 and len(vlans) > 1 else ETH_P_8021Q
        tags += struct.pack("!H", tpid) + struct.pack("!H", vid & 0xFFF)
    return _MACS + tags + struct.pack("!H", ethertype) + payload


def tcp(sport: int, dport: int, flags: int) -> bytes:
    """A 20-byte TCP header."""
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"probe") -> bytes:
    """A UDP header and payload."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(
    src: str, dst: str, proto: int, payload: bytes, *, options: bytes = b"", frag_offset: int = 0
) -> bytes:
    """An IPv4 packet; ``options`` (a multiple of 4 bytes) make ``ihl`` > 5;
    ``frag_offset`` (in 8-byte units) makes it a non-first fragment."""
    ihl = 5 + len(options) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(payload),
        1,
        frag_offset & 0x1FFF,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + options + payload


def ipv6_ext(kind: int, nexthdr: int, *, frag_offset: int = 0) -> bytes:
    """One IPv6 extension header of type ``kind`` (0 HOP, 43 ROUTING, 60 DST: 8 bytes;
    44 FRAGMENT with ``frag_offset`` in 8-byte units; 51 AH: 12 bytes)."""
    if kind == 44:
        return struct.pack("!BBHI", nexthdr, 0, (frag_offset << 3) | 1, 7)
    if kind == 51:
        return struct.pack("!BB", nexthdr, 1) + bytes(10)  # (1 + 2) * 4 = 12 bytes
    return struct.pack("!BB", nexthdr, 0) + bytes(6)


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    """An IPv6 packet; ``payload`` starts with the header ``nexthdr`` names."""
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), nexthdr, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def tcp_frame(src: str, dst: str, dport: int, flags: int = SYN, sport: int = 40000) -> bytes:
    """A TCP segment from ``src`` to ``dst`` (either family) in an Ethernet frame."""
    segment = tcp(sport, dport, flags)
    if ":" in src:
        return ethernet(ETH_P_IPV6, ipv6(src, dst, IPPROTO_TCP, segment))
    return ethernet(ETH_P_IP, ipv4(src, dst, IPPROTO_TCP, segment))
