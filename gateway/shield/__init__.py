"""The eBPF shield, for plugins: put a client or prefix where the kernel drops its new connections.

A plugin that has decided a client is abusive (the rate limiter after
``shield_after`` refusals, an ACL, a plugin of yours reading a threat feed)
adds it here; from then on the kernel program at the ingress of ``[shield]
interfaces`` drops its TCP SYNs (and its UDP datagrams to a UDP listener's
ports) before they reach nftables, TPROXY or the gateway: no accept, no
task, no refusal to pay for. Established connections are never touched, and
only the gateway's own listening and intercepted ports are (never SSH or
another service of the host).

::

    from gateway import shield

    try:
        shield.add(flow.client[0], ttl=120.0, reason="20 refusals in 10s", source="myplugin")
    except shield.ShieldRefused as exc:
        log.warning("not shielded: %s", exc.reason)

The functions, on the table every worker of the gateway shares:

* :func:`add` ``(network, ttl, reason, *, source, static=False) -> Entry``:
  an address or CIDR, for ``ttl`` seconds. A plugin's automatic verdict must
  have a TTL; only ``static=True`` entries (a configured deny list) may have
  None. Adding a listed network renews it (the later deadline wins). Raises
  :class:`ShieldRefused` (with ``reason``) for a network on the never-list
  (loopback, the gateway's own addresses, every listener's
  ``proxy_protocol_trusted``: a PROXY-protocol balancer's address is every
  client's address to the kernel; ``[shield] never``), a TTL not above 0, an
  IPv6 prefix covering ``::ffff:0:0/96``, or a table full of entries without
  expiry. ``ValueError`` for text that is not an address or CIDR.
* :func:`remove` ``(network) -> Entry | None``: the entry listed exactly as
  ``network``, removed (with its drop count), or None.
* :func:`lookup` ``(address) -> Entry | None``: the live entry holding
  ``address`` (longest prefix). Cheap (with an empty table that no process
  changed, one read of the journal's shared counter: no system call, no
  lock): call it from ``l4gw_admit`` to refuse listed clients when the kernel
  shield is off.
* :func:`entries` ``() -> list[Entry]``: the live entries with their drops.
* :func:`kernel_enabled` ``() -> bool``: whether the kernel drops for the
  table; when False the table still works and the plugins enforce it in
  admit (``/status`` under ``shield`` says why it is off).

Every add, removal, expiry and eviction is logged once (by the process that
made it) and counted (``l4gw.shield.changes``). An :class:`Entry` is a frozen
value: ``network``, ``reason``, ``source``, ``deadline_ns`` (CLOCK_MONOTONIC,
0: none), ``added`` (wall clock), ``drops``, and ``expires_in(now_ns)``.

In a plugin's tests, ``gateway.shield.table`` is not public; use these
functions (they work without a kernel shield: a table of the test process).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from gateway.shield.never import Network
from gateway.shield.table import Entry, ShieldRefused, current, lookup

__all__ = [
    "Entry",
    "ShieldRefused",
    "add",
    "entries",
    "kernel_enabled",
    "lookup",
    "remove",
]


def add(
    network: str | IPv4Address | IPv6Address | Network,
    ttl: float | None,
    reason: str,
    *,
    source: str,
    static: bool = False,
) -> Entry:
    """Shield ``network`` for ``ttl`` seconds (see the module docstring).

    Raises:
        ShieldRefused: not shielded, and why.
        ValueError: not an address or CIDR.
    """
    return current().add(network, ttl, reason, source=source, static=static)


def remove(network: str | IPv4Address | IPv6Address | Network) -> Entry | None:
    """Remove the entry listed as ``network``; None when there is none."""
    return current().remove(network)


def entries() -> list[Entry]:
    """The live entries, with the kernel's drop counts."""
    return current().entries()


def kernel_enabled() -> bool:
    """Whether the kernel program enforces the table (else the plugins do, in admit)."""
    return current().kernel is not None
