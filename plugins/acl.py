"""Static client denies (``[plugin.acl]``), enforced in the kernel shield and in admit.

``deny = ["198.51.100.0/24", "2001:db8:bad::/48"]``: clients in these prefixes
are refused. Each prefix is put in the eBPF shield (source ``acl``, no
expiry), so their SYNs are dropped before the gateway sees them; and each is
refused in ``l4gw_admit`` too (rule ``deny``, reason ``acl deny <prefix>``),
for when the kernel shield is off or could not take a prefix (the
never-list: a ``deny`` that holds the gateway's own address or a trusted
PROXY-protocol balancer is refused by the shield with a warning, and only
refused in admit).

The plugin also enforces the whole shield table in admit (rule ``shield``):
with the kernel shield off, an entry added by the rate limiter, another
plugin or an operator (``l4gw shield add``) still keeps its client out.

Rules kept here:

* **The list follows the config.** At start and on each reload the deny
  prefixes are put in the shield; ``acl`` entries no longer in the list are
  removed. Every worker applies the same list; the shield makes a repeated
  identical add a no-op, so each change is logged once. An ``acl`` entry
  deleted by an operator (``l4gw shield del``) comes back at the next reload
  or worker restart: edit the list to lift it for good.
* **No ``allow``.** An exception inside a denied prefix cannot be expressed
  in the kernel's longest-prefix trie without a second map; carve the deny
  prefixes instead.
* Refused with RST (``refuse_with = "fin"`` for FIN).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

from gateway import Config, Field, Flow, Refusal, hookimpl, shield
from gateway import schema as s

log = logging.getLogger("l4gw.acl")

SOURCE = "acl"

SCHEMA: dict[str, Field] = {
    "deny": Field(
        s.list_of(s.network),
        (),
        "client CIDRs refused: put in the eBPF shield (no expiry) and refused in l4gw_admit",
    ),
    "refuse_with": Field(s.choice("rst", "fin"), "rst", "how a refused connection is closed"),
}

Network = IPv4Network | IPv6Network


class Prefixes:
    """A set of networks and a longest-prefix lookup of an address in them."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = frozenset(_plain(n) for n in networks)
        self._lengths = {
            v: sorted({n.prefixlen for n in self.networks if n.version == v}, reverse=True)
            for v in (4, 6)
        }

    def match(self, address: str) -> Network | None:
        if not self.networks:  # the usual case: no deny list, nothing to parse per connection
            return None
        host = _plain(ip_network(address))
        for length in self._lengths[host.version]:
            net = host.supernet(new_prefix=length)
            if net in self.networks:
                return net
        return None


def _plain(net: Network) -> Network:
    """IPv4-mapped IPv6 as IPv4 (a dual-stack listener reports IPv4 clients so)."""
    if isinstance(net, IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


class Acl:
    """The ``acl`` plugin."""

    def __init__(self) -> None:
        self.deny = Prefixes(())
        self.reset = True
        self.refused = 0

    def configure(self, section: Mapping[str, Any]) -> None:
        deny = Prefixes(section.get("deny", ()))
        self.reset = section.get("refuse_with", "rst") == "rst"
        self.deny = deny
        self.apply(deny.networks)

    def apply(self, wanted: frozenset[Network]) -> None:
        """Put ``wanted`` in the shield; take out ``acl`` entries not in it."""
        for entry in shield.entries():
            if entry.source == SOURCE and entry.network not in wanted:
                shield.remove(entry.network)
        for net in sorted(wanted, key=str):
            try:
                shield.add(net, None, f"acl deny {net}", source=SOURCE, static=True)
            except shield.ShieldRefused as exc:
                log.warning("acl: deny %s is refused in admit only: %s", net, exc.reason)

    # tryfirst: a denied client costs no rate-limit token. The hook is this method
    # itself (``specname``), not a wrapper calling it: one Python call less per flow.
    @hookimpl(specname="l4gw_admit", tryfirst=True)
    def admit(self, flow: Flow) -> Refusal | None:
        ip = flow.client[0]
        deny = self.deny
        # The usual case, no deny list, asks nothing of it.
        denied = deny.match(ip) if deny.networks else None
        if denied is not None:
            self.refused += 1
            return Refusal(f"acl deny {denied}", rule="deny", reset=self.reset)
        entry = shield.lookup(ip)
        if entry is not None:
            self.refused += 1
            return Refusal(
                f"shielded {entry.network} ({entry.reason}; source {entry.source})",
                rule="shield",
                reset=self.reset,
            )
        return None

    @hookimpl
    def l4gw_config_sections(self) -> Mapping[str, Mapping[str, Field]]:
        return {"acl": SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> None:
        self.configure(config.plugin("acl"))

    @hookimpl
    def l4gw_status(self) -> dict[str, Any]:
        return {"deny": sorted(map(str, self.deny.networks)), "refused": self.refused}


plugin = Acl()
"""The instance the ``acl`` entry point registers."""
