"""Loading the kernel shield for a configuration, in the process that forks the workers.

Rules kept here:

* **Before the fork, before the drop.** :func:`open_kernel` runs in the
  supervisor (or the single process) while it is still root, so every worker
  inherits the map fds and the program needs no capability afterwards.
* **Recovery first.** What a killed gateway left on the interfaces (a netlink
  filter or XDP program, a pin) is removed before attaching, one log line each.
* **One line when it cannot load**, at error level, then the gateway runs
  without it: the table keeps its entries and the plugins refuse listed clients
  in ``l4gw_admit``.
* **Only the gateway's ports** (:mod:`gateway.shield.ports`); an intercept
  without ports gets a line at load saying it is not shielded on every port.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.config import Config
from gateway.shield import table
from gateway.shield.kernel import KernelShield, ShieldUnavailable, recover_stale
from gateway.shield.ports import ports_of

__all__ = ["open_kernel", "shield_installed"]

log = logging.getLogger("l4gw.shield")


def open_kernel(config: Config) -> tuple[KernelShield | None, str]:
    """The kernel shield of ``config``, attached; or None and the one line why not."""
    section = config.shield
    if section is None:
        return None, "no [shield] section"
    for line in recover_stale(section.interfaces):
        log.warning("shield: removed what a previous gateway left: %s", line)
    tcp_ports, udp_ports = ports_of(config)
    if config.tproxy is not None and any(not ic.ports for ic in config.tproxy.intercept):
        log.warning(
            "shield: an intercept without ports is shielded only on the listener and "
            "intercepted ports named in the config (never on every port of the host)"
        )
    try:
        kernel = KernelShield.load(
            section.interfaces, section.mode, section.max_entries, tcp_ports, udp_ports
        )
    except ShieldUnavailable as exc:
        log.error("%s; running without it (listed clients are refused in admit)", exc)
        return None, str(exc)
    log.info(
        "shield: loaded (%s) on %s for TCP ports %s, UDP ports %s",
        kernel.mode,
        ", ".join(section.interfaces),
        _ports(tcp_ports),
        _ports(udp_ports),
    )
    return kernel, ""


def _ports(ports: frozenset[int]) -> str:
    return ",".join(map(str, sorted(ports))) or "none"


@contextmanager
def shield_installed(config: Config) -> Iterator[KernelShield | None]:
    """Load the kernel shield of ``config`` and install the table every worker
    forked inside the block shares; detach and free it when the block ends."""
    kernel, why = open_kernel(config)
    cap = config.shield.max_entries if config.shield is not None else table.DEFAULT_MAX_ENTRIES
    table.install(table.Shield(kernel=kernel, off_reason=why, max_entries=cap))
    try:
        yield kernel
    finally:
        if kernel is not None:
            kernel.close()
