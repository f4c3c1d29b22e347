"""A test-only plugin that raises on purpose, loaded through the entry point.

``[plugin.faulty] fail_in = "admit" | "route" | "closed"`` chooses the hook
that raises; only connections to the listener named in ``listener`` are hit,
so the test can show that the gateway keeps serving the others.
"""

from __future__ import annotations

from typing import Any

from gateway import Config, Field, Flow, Route, hookimpl
from gateway.schema import choice, string

_settings: dict[str, Any] = {}


@hookimpl
def l4gw_config_sections() -> dict[str, Any]:
    return {
        "faulty": {
            "fail_in": Field(choice("admit", "route", "closed", "none"), "none"),
            "listener": Field(string, "boom"),
        }
    }


@hookimpl
def l4gw_configure(config: Config) -> None:
    _settings.update(config.plugin("faulty"))


def _boom(flow: Flow, hook: str) -> None:
    if _settings.get("fail_in") == hook and flow.listener == _settings.get("listener"):
        raise RuntimeError(f"faulty plugin fails in {hook} on purpose")


@hookimpl(tryfirst=True)
def l4gw_admit(flow: Flow) -> None:
    _boom(flow, "admit")


@hookimpl(tryfirst=True)
def l4gw_route(flow: Flow, config: Config) -> Route | None:
    _boom(flow, "route")
    return None


@hookimpl
def l4gw_connection_closed(flow: Flow) -> None:
    _boom(flow, "closed")
