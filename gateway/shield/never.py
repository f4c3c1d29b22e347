"""The never-list: addresses the shield refuses to block, and why each is on it.

Blocking one of these would lock out more than one client: the host itself
(loopback, the gateway's own addresses: its health checks, its own
connections through TPROXY), or everyone behind a PROXY-protocol load balancer
(``proxy_protocol_trusted``: the kernel sees the balancer's address, never the
client's, so a shield entry for it drops every client it forwards).

Rules kept here:

* **An overlap is enough to refuse.** A prefix that contains a never address
  (``0.0.0.0/0``, a /16 around the gateway) and an address inside a never
  prefix are both refused, with a reason naming what the entry would block.
* **Plain values.** :class:`NeverList` is built from networks and checks
  networks; reading the local addresses (netlink) is :func:`local_addresses`,
  called at start and on reload by :class:`gateway.shield.table.Shield`.
* **IPv4-mapped IPv6 is IPv4.** ``::ffff:198.18.0.1`` is checked (and
  stored, :func:`normalize`) as ``198.18.0.1``: a dual-stack listener reports
  its IPv4 clients in that form.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

log = logging.getLogger("l4gw.shield")

Network = IPv4Network | IPv6Network

LOOPBACK: tuple[Network, ...] = (
    IPv4Network("127.0.0.0/8"),
    IPv6Network("::1/128"),
)


def normalize(value: str | IPv4Address | IPv6Address | Network) -> Network:
    """An address or CIDR as a network; IPv4-mapped IPv6 becomes IPv4.

    Host bits are cleared (``198.18.0.7/24`` is ``198.18.0.0/24``), as the
    config's CIDR keys do.

    Raises:
        ValueError: not an address or CIDR (the message quotes it).
    """
    try:
        net = ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        raise ValueError(f'not an address or CIDR: "{value}"') from None
    if isinstance(net, IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


@dataclass(frozen=True, slots=True)
class Never:
    """One network the shield never blocks."""

    network: Network
    why: str
    """What it is, for a refusal ("loopback", "the gateway's own address on eth0", ...)."""


class NeverList:
    """The networks the shield never blocks.

    Args:
        entries: each network with what it is.
    """

    def __init__(self, entries: Iterable[Never]) -> None:
        self.entries = tuple(entries)

    def refusal(self, net: Network) -> str | None:
        """Why ``net`` may not be shielded, or None when it may."""
        for never in self.entries:
            if never.network.version == net.version and never.network.overlaps(net):
                if net.prefixlen <= never.network.prefixlen:
                    what = f"{net} contains {never.network} ({never.why})"
                else:
                    what = f"{net} is inside {never.network} ({never.why})"
                return f"never shielded: {what}"
        return None

    @classmethod
    def build(
        cls,
        configured: Iterable[Network] = (),
        trusted: Iterable[tuple[str, Network]] = (),
        local: Iterable[tuple[str, Network]] = (),
    ) -> NeverList:
        """Loopback, then the gateway's own addresses, trusted balancers and ``[shield] never``.

        Args:
            configured: ``[shield] never``.
            trusted: (listener name, CIDR) of every ``proxy_protocol_trusted``.
            local: (interface, address) of every address of the gateway's namespace.
        """
        entries = [Never(n, "loopback") for n in LOOPBACK]
        entries += [Never(normalize(n), f"the gateway's own address on {i}") for i, n in local]
        entries += [
            Never(
                normalize(n),
                f"proxy_protocol_trusted of listener {name}: a PROXY-protocol load balancer, "
                "whose address the kernel sees for every client it forwards",
            )
            for name, n in trusted
        ]
        entries += [Never(normalize(n), "[shield] never") for n in configured]
        return cls(entries)


def from_config(config: Any, local: Iterable[tuple[str, Network]]) -> NeverList:
    """The never-list of a :class:`gateway.config.Config` and the local addresses."""
    shield = getattr(config, "shield", None)
    configured = tuple(getattr(shield, "never", ()) or ())
    trusted = [(lc.name, n) for lc in config.listeners for n in lc.proxy_protocol_trusted]
    return NeverList.build(configured, trusted, local)


def local_addresses() -> list[tuple[str, Network]]:
    """Every address of this network namespace, as (interface, host network).

    An empty list (and a warning) when netlink cannot be read: loopback and the
    configured entries still protect, and the next reload tries again.
    """
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            found = []
            for msg in ipr.get_addr():
                addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if addr:
                    found.append((str(names.get(msg["index"], msg["index"])), normalize(addr)))
            return found
    except Exception as exc:  # netlink or pyroute2 trouble: degrade, say so
        log.warning("shield: cannot read the local addresses (%s); never-list without them", exc)
        return []
