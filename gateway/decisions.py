"""The decisions every flow goes through, TCP connection or UDP session alike.

Admit, route and routed are taken here for both transports, so they apply
the same hooks with the same failure policies and leave the same record on
the :class:`Flow` (who refused, which rule, why). The transports only act on
the outcome: close a socket, drop a session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.flow import CloseReason, Flow, Route
from gateway.plugin_manager import Raised
from gateway.schema import format_address

if TYPE_CHECKING:
    from gateway.connection import Runtime


async def refusal(rt: Runtime, flow: Flow, hook: str, **more: Any) -> tuple[str, bool] | None:
    """Run a refusal hook (``l4gw_admit``, ``l4gw_routed``).

    Returns:
        None to go on, or (close reason, whether to close with a reset).
    """
    try:
        refused = await rt.plugins.decide(hook, rt.admit_open, flow=flow, **more)
    except Raised as exc:
        flow.refused_by, flow.error = exc.plugin, repr(exc.error)
        return CloseReason.PLUGIN_ERROR, False
    if refused is None:
        return None
    flow.refused_by, refused_with = refused
    flow.refused_rule, flow.error = refused_with.rule or None, refused_with.reason
    return CloseReason.REFUSED, refused_with.reset


async def choose_route(rt: Runtime, flow: Flow) -> Route | str:
    """Ask the route hook; the Route, or the close reason when there is none."""
    try:
        routed = await rt.plugins.decide("l4gw_route", rt.route_open, flow=flow, config=rt.config)
    except Raised as exc:
        flow.refused_by, flow.error = exc.plugin, repr(exc.error)
        return CloseReason.PLUGIN_ERROR
    if routed is None:
        flow.refused_by = "core"
        return CloseReason.NO_ROUTE
    route: Route = routed[1]
    flow.route, flow.cluster = route.name, route.cluster.name
    flow.add_event("routed", route=route.name, cluster=route.cluster.name)
    return route


def where(flow: Flow) -> str:
    """Listener, addresses and choices of a flow, for its close log line."""
    return (
        f"{flow.listener} client={format_address(*flow.client)} "
        f"dst={format_address(*flow.destination)} route={flow.route or '-'} "
        f"endpoint={flow.endpoint or '-'}"
    )


def why(flow: Flow) -> str:
    """Who refused it and the error, for its close log line ("" when neither)."""
    text = ""
    if flow.refused_by:
        text = f" by={flow.refused_by}" + (f"/{flow.refused_rule}" if flow.refused_rule else "")
    return text + (f" error={flow.error!r}" if flow.error else "")
