"""The destination ports the shield may drop toward: the gateway's, never the host's others.

The program sees a packet's original destination port (TPROXY rewrites
nothing before it), so the ports are the listeners' and the intercepted ones,
per protocol. An intercept with no ``ports`` (every port) would need every port
of the host, SSH included: it adds none, and its traffic is shielded only on
the ports named elsewhere in the config (gateway/shield/startup.py says so at
load). Set at load and again on every reload (:meth:`Shield.configure
<gateway.shield.table.Shield.configure>` calls :meth:`KernelShield.set_ports
<gateway.shield.kernel.KernelShield.set_ports>` with :func:`ports_of`).
"""

from __future__ import annotations

from gateway.config import Config

__all__ = ["ports_of"]


def ports_of(config: Config) -> tuple[frozenset[int], frozenset[int]]:
    """(TCP ports, UDP ports) the shield may drop toward: listeners' and intercepted.

    Called at load and on every reload (:meth:`KernelShield.set_ports`).
    """
    ports: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for lc in config.listeners:
        if lc.port:
            ports[lc.protocol].add(lc.port)
    if config.tproxy is not None:
        for ic in config.tproxy.intercept:
            ports[ic.protocol].update(ic.ports)
    return frozenset(ports["tcp"]), frozenset(ports["udp"])
