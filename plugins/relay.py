"""Relay tiers: move an established flow's bytes with splice(2) or the eBPF sockmap.

A thin adaptor from the hooks to :mod:`gateway.relay` (a semi-public namespace):
the ``[plugin.relay]`` section and the decisions on it are
:mod:`gateway.relay.policy`, the start-up probing :mod:`gateway.relay.probe`, and
the tiers of one process, which move the flows, :mod:`gateway.relay.tiers`
(docs/accelerator.md says what each tier does and why the default order).

* ``l4gw_config_sections`` declares ``[plugin.relay]``;
* ``l4gw_configure`` applies it (also on reload);
* ``l4gw_startup`` probes the listed kernel tiers off the connection path and
  starts publishing ``<status_dir>/<pid>.json`` for ``l4gw accel status``;
* ``l4gw_relay`` takes a flow only while a kernel tier is enabled: otherwise it
  returns None and the core relays the flow exactly as without this plugin. It
  answers one :class:`gateway.Handover` for every flow (the core copies the flow
  until its promotion is due, then the tiers take it), or the whole relay when
  promotion is at once;
* ``l4gw_status`` is the tiers' status (``/status`` on the admin endpoint);
* ``l4gw_shutdown`` closes the accelerator and removes the status file.

The entry point names this module; its hook functions are those of :data:`plugin`,
the instance it registers (tests make their own :class:`RelayPlugin`).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Mapping
from typing import Any

import trio

from gateway import Config, Field, Flow, Handover, hookimpl
from gateway.relay.policy import SCHEMA
from gateway.relay.tiers import RelayTiers


class RelayPlugin:
    """The ``relay`` plugin: the hooks over one process's :class:`RelayTiers`.

    Args:
        tiers: The tiers to drive (default: new ones).
    """

    def __init__(self, tiers: RelayTiers | None = None) -> None:
        self.tiers = tiers if tiers is not None else RelayTiers()

    @hookimpl
    def l4gw_config_sections(self) -> Mapping[str, Mapping[str, Field]]:
        return {"relay": SCHEMA}

    @hookimpl
    def l4gw_configure(self, config: Config) -> None:
        self.tiers.configure(config)

    @hookimpl
    def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> Awaitable[None]:
        return self.tiers.startup(nursery)

    @hookimpl
    def l4gw_relay(
        self, flow: Flow, client: socket.socket, upstream: socket.socket, idle_timeout: float
    ) -> Handover | Awaitable[str] | None:
        tiers = self.tiers
        if tiers.handover is not None:
            return tiers.handover  # the core copies the flow first (gateway.Handover)
        if not tiers.plan:
            return None
        return tiers.relay(flow, client, upstream, idle_timeout)

    @hookimpl
    def l4gw_status(self) -> dict[str, Any]:
        return self.tiers.status()

    @hookimpl
    def l4gw_shutdown(self, config: Config) -> None:
        self.tiers.shutdown()


plugin = RelayPlugin()
"""The instance the ``relay`` entry point registers."""
