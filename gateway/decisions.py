"""The stages every flow goes through, TCP connection or UDP session alike.

Admit, route and routed, the connect loop over a route's endpoints and the
PROXY header for the backend are taken here for both transports, so they
apply the same hooks with the same failure policies and leave the same
record on the :class:`Flow` (who refused, which rule, which endpoints were
tried and why they failed). The transports only act on the outcome: close a
socket, drop a session; and bring what differs: how one upstream socket is
opened (gateway/upstream.py for TCP, gateway/udp/sockets.py for UDP).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from gateway import discovery, proxy_protocol
from gateway.config import ClusterConfig, Endpoint
from gateway.flow import CloseReason, Flow, Route
from gateway.plugin_manager import Raised
from gateway.runtime import Runtime
from gateway.upstream import ConnectFailed, ResetAfterConnect

_NO_LIMIT: Final = contextlib.nullcontext()

Opener = Callable[[Endpoint, float, tuple[str, int] | None], Awaitable[socket.socket]]
"""One connect attempt: ``(endpoint, timeout, source)`` to a connected socket, or
:class:`~gateway.upstream.ConnectFailed`."""


async def refusal(rt: Runtime, flow: Flow, hook: str, *more: Any) -> tuple[str, bool] | None:
    """Run a refusal hook (``l4gw_admit``, ``l4gw_routed``); ``more``: the hook's
    arguments after the flow, in its spec's order (``l4gw_routed``: the route).

    Returns:
        None to go on, or (close reason, whether to close with a reset).
    """
    try:
        refused = await rt.plugins.decide(hook, rt.admit_open, flow, *more)
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
        routed = await rt.plugins.decide("l4gw_route", rt.route_open, flow, rt.config)
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


async def connect_upstream(
    rt: Runtime, route: Route, flow: Flow, attempt: Opener, source: tuple[str, int] | None
) -> socket.socket | str:
    """Try the route's endpoints in order until one connects.

    At most ``connect_attempts`` endpoints, all within ``connect_budget``; each
    attempt is reported to ``l4gw_connect_attempt``, and ``flow.endpoint`` names
    the one connected to.

    Args:
        rt: the flow's runtime.
        route: the route chosen.
        flow: the flow; its ``error`` lists each failed attempt when none connects.
        attempt: one attempt (:func:`gateway.upstream.connect` for TCP; a UDP
            session's opener, which never waits).
        source: bind each upstream socket here first (``upstream_source =
            "client"``), else None.

    Returns:
        The connected socket, or the close reason: ``no_endpoint`` when the
        cluster has none at all (not merely none healthy), ``connect_failed``, or
        ``backend_reset`` when a backend reset right after accepting (not worth
        a retry elsewhere: it has seen the connection).
    """
    cluster = route.cluster
    if not route.endpoints and not discovery.registry.current(cluster):
        flow.error = f"cluster {cluster.name} has no endpoints"
        return CloseReason.NO_ENDPOINT
    errors: list[str] = []
    # No budget (the default): no cancel scope, which costs ~5 µs per connection.
    budget = trio.move_on_after(cluster.connect_budget) if cluster.connect_budget else _NO_LIMIT
    # Nobody takes the attempt hook (every implementation idle): no clock reads for it.
    observed = rt.attempt_hook
    with budget:
        for endpoint in route.endpoints[: cluster.connect_attempts]:
            start = time.monotonic() if observed else 0.0
            try:
                sock = await attempt(endpoint, cluster.connect_timeout, source)
            except ConnectFailed as exc:
                errors.append(f"{endpoint}: {exc}")
                if observed:
                    # (flow, endpoint, error, seconds): by position, as the spec orders them.
                    seconds = time.monotonic() - start
                    rt.plugins.observe("l4gw_connect_attempt", flow, endpoint, str(exc), seconds)
                if isinstance(exc, ResetAfterConnect):
                    flow.endpoint, flow.error = endpoint.text, str(exc)
                    return CloseReason.BACKEND_RESET
                continue
            if observed:
                seconds = time.monotonic() - start
                rt.plugins.observe("l4gw_connect_attempt", flow, endpoint, None, seconds)
            flow.endpoint = endpoint.text
            return sock
    if not route.endpoints:
        errors.append("no endpoint available")
    elif len(errors) < min(len(route.endpoints), cluster.connect_attempts):
        errors.append(f"connect budget {cluster.connect_budget:g}s spent")
    flow.error = "; ".join(errors)
    return CloseReason.CONNECT_FAILED


def proxy_header(cluster: ClusterConfig, flow: Flow) -> bytes:
    """The PROXY header ``cluster`` asks for: the client and original destination of
    ``flow``, and (v2) its SNI and the traceparent to continue.

    A TCP connection sends it once, before its first byte; a UDP session (v2 only:
    v1 has no UDP form) before each datagram, with transport UDP.
    """
    src, dst = flow.client, flow.destination
    if (":" in src[0]) != (":" in dst[0]):
        # PROXY headers cannot mix families; say "unknown" rather than lie.
        return (
            b"PROXY UNKNOWN\r\n"
            if cluster.proxy_protocol == "v1"
            else proxy_protocol.encode_v2(None, None, local=True)
        )
    if cluster.proxy_protocol == "v1":
        return proxy_protocol.encode_v1(src, dst)
    tlvs: list[tuple[int, bytes]] = []
    if flow.sni:
        tlvs.append((proxy_protocol.PP2_TYPE_AUTHORITY, flow.sni.encode()))
    if cluster.proxy_protocol_traceparent and flow.traceparent_out:
        tlvs.append((proxy_protocol.PP2_TYPE_TRACEPARENT, flow.traceparent_out.encode()))
    return proxy_protocol.encode_v2(src, dst, transport=flow.transport, tlvs=tlvs)
