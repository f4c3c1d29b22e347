"""The shield map's key and value bytes (bpf/l4gw_shield.bpf.c documents the layout).

Rules kept here:

* **One trie for both families.** IPv4 ``a.b.c.d/n`` is stored as the IPv4-mapped
  ``::ffff:a.b.c.d/(96+n)``, so the program makes one lookup whatever the family.
* **No IPv6 prefix may cover ::ffff:0:0/96.** In one trie such a prefix (any of
  /80 or shorter that contains it: ``::/64``, ``::/0``) would match every IPv4
  source (shield.md §3: ``::/64`` matched 198.18.0.1). :func:`key_of` refuses it;
  a mapped IPv6 network (``::ffff:198.18.0.0/120``) is taken as the IPv4 one.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = [
    "ENTRY",
    "KEY",
    "PORTS_SIZE",
    "Entry",
    "IPNet",
    "UnshieldableError",
    "entry_bytes",
    "key_of",
    "network_of",
    "parse_entry",
    "ports_bitmap",
]

KEY: Final = struct.Struct("=I16s")
"""struct l4gw_shield_key: u32 prefixlen (host order), u8 addr[16] (network order)."""
ENTRY: Final = struct.Struct("=QQII")
"""struct l4gw_shield_entry: u64 deadline_ns, u64 drops, u32 prefixlen, u32 reserved."""
PORTS_SIZE: Final = 2 * 8192
"""struct l4gw_shield_ports: a 65536-bit map for TCP, then one for UDP."""

_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


class UnshieldableError(ValueError):
    """A network the trie cannot hold without shielding more than it says."""


Entry = tuple[int, int, int]
"""(deadline_ns, drops, prefixlen) of one map value."""


def key_of(net: IPNet) -> bytes:
    """The 20-byte trie key of ``net``.

    Raises:
        UnshieldableError: an IPv6 prefix that covers ::ffff:0:0/96 (it would
            match every IPv4 source).
    """
    if isinstance(net, ipaddress.IPv6Network):
        if net.prefixlen >= 96 and net.subnet_of(_MAPPED):
            mapped = net.network_address.ipv4_mapped
            assert mapped is not None
            net = ipaddress.IPv4Network((mapped, net.prefixlen - 96))
        elif _MAPPED.subnet_of(net):
            raise UnshieldableError(
                f"{net} contains ::ffff:0:0/96, so it would match every IPv4 source; "
                "shield the IPv6 prefixes around it instead"
            )
        else:
            return KEY.pack(net.prefixlen, net.network_address.packed)
    return KEY.pack(
        96 + net.prefixlen, _MAPPED.network_address.packed[:12] + net.network_address.packed
    )


def network_of(key: bytes) -> IPNet:
    """The network a trie key stands for (the inverse of :func:`key_of`)."""
    prefixlen, addr = KEY.unpack(key)
    v6 = ipaddress.IPv6Network((addr, prefixlen), strict=False)
    if prefixlen >= 96 and v6.subnet_of(_MAPPED):
        mapped = v6.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, prefixlen - 96))
    return v6


def entry_bytes(deadline_ns: int, drops: int, prefixlen: int) -> bytes:
    """A map value."""
    return ENTRY.pack(deadline_ns, drops, prefixlen, 0)


def parse_entry(raw: bytes) -> Entry:
    """(deadline_ns, drops, prefixlen) of a map value."""
    deadline, drops, prefixlen, _ = ENTRY.unpack(raw)
    return deadline, drops, prefixlen


def ports_bitmap(
    tcp_ports: set[int] | frozenset[int], udp_ports: set[int] | frozenset[int]
) -> bytes:
    """The l4gw_shield_prt value: bit ``p & 7`` of byte ``p >> 3``, TCP then UDP.

    Raises:
        ValueError: a port outside 1..65535.
    """
    out = bytearray(PORTS_SIZE)
    for base, ports in ((0, tcp_ports), (8192, udp_ports)):
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"not a port: {port}")
            out[base + (port >> 3)] |= 1 << (port & 7)
    return bytes(out)
