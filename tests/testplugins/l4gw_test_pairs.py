"""A test-only plugin whose per-connection hooks are idle unless ``[plugin.pairs]
watch = true``, loaded through the entry point.

It counts the connections it saw open and close, and the closes of connections it
never saw open ("unpaired"), in ``/status`` under ``pairs``: what a plugin that
declares hooks idle relies on is that a connection keeps, to its close, the hooks
of the configuration it started under.
"""

from __future__ import annotations

from typing import Any

from gateway import Config, Field, Flow, hookimpl
from gateway.schema import boolean

_IDLE = frozenset({"l4gw_connection_opened", "l4gw_connection_closed"})
_open: set[int] = set()
_counts = {"opened": 0, "closed": 0, "unpaired": 0}


@hookimpl
def l4gw_config_sections() -> dict[str, Any]:
    return {"pairs": {"watch": Field(boolean, False)}}


@hookimpl
def l4gw_configure(config: Config) -> frozenset[str] | None:
    return None if config.plugin("pairs").get("watch") else _IDLE


@hookimpl
def l4gw_connection_opened(flow: Flow) -> None:
    _open.add(flow.id)
    _counts["opened"] += 1


@hookimpl
def l4gw_connection_closed(flow: Flow) -> None:
    if flow.id in _open:
        _open.remove(flow.id)
        _counts["closed"] += 1
    else:
        _counts["unpaired"] += 1


@hookimpl
def l4gw_status() -> dict[str, int]:
    return dict(_counts)
