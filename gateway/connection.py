"""The path of one TCP connection, from accept to close (DESIGN.md, stages 1–8).

Rules kept here:

* Every connection is recorded exactly once, in :func:`handle`'s ``finally``
  (a connection refused over capacity at once): byte counts, end time, close
  reason, the closed hook, the log line (:func:`gateway.runtime.record_close`,
  the record of a UDP session too).
* Admit, route, routed, the connect loop and the PROXY header to the backend
  are the stages UDP sessions go through too: they live in gateway/decisions.py,
  this module brings what is TCP's own (the PROXY header from a trusted proxy,
  the ClientHello peek, the relay).
* Nothing is connected upstream before admit and route said yes: the gateway
  forwards only where the configuration sends it, never to the original
  destination as such (no open relay).
* Peeked bytes stay in the socket; only a PROXY header is consumed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from trio.lowlevel import wait_writable

from gateway import proxy_protocol
from gateway.clienthello import ClientHello, parse_client_hello
from gateway.config import ListenerConfig
from gateway.decisions import choose_route, connect_upstream, proxy_header, refusal
from gateway.flow import CloseReason, Flow, Handover, unmap
from gateway.peek import PeekFailed, peek, recv_exactly_queued
from gateway.relay.copy import Promotion, abort_on_close
from gateway.runtime import Runtime, next_flow_id, record_close
from gateway.upstream import connect

log = logging.getLogger("l4gw.conn")

_close: Callable[[socket.socket], None] = socket.SocketType.close
"""``sock.close()`` without the two Python calls of ``socket.socket.close`` on the way
to the C method of its base type (its ``_io_refs`` and ``_closed`` serve ``makefile()``,
which these sockets never use): two sockets per connection."""


async def handle(
    rt: Runtime,
    lc: ListenerConfig,
    sock: socket.socket,
    peer: Any,
    draining: Callable[[], bool],
    local: tuple[str, int] | None = None,
    done: Callable[[], None] | None = None,
) -> None:
    """Serve one accepted connection; always closes ``sock``.

    ``local`` is the connection's local address when the listener knows it
    (:attr:`gateway.listeners.Listener.local`), else it is asked of ``sock``.
    ``done`` is called last, however the connection ended (the server counts the
    listener's connections with it: a callback, not a wrapping task per connection).
    """
    try:
        if local is None:
            try:
                local = unmap(sock.getsockname())
            except OSError:
                # Reset between accept and now: nothing to record.
                sock.close()
                return
        # An IPv4 peer is (host, port) already; only an IPv6 one needs unmapping.
        client = peer if len(peer) == 2 else unmap(peer)
        flow = Flow(next_flow_id(), lc.name, "tcp", client, local)
        rt.flows[flow.id] = flow
        upstream: list[socket.socket] = []
        try:
            flow.close_reason = await _serve(rt, lc, sock, flow, upstream)
        except Exception as exc:
            log.exception("connection %d: internal error", flow.id)
            flow.close_reason = CloseReason.INTERNAL_ERROR
            flow.error = repr(exc)
        finally:
            if flow.close_reason is None:
                # Cancelled (possibly inside an exception group): only the drain
                # cancels connections.
                flow.close_reason = CloseReason.DRAIN if draining() else CloseReason.INTERNAL_ERROR
            for s in upstream:
                _close(s)
            _close(sock)
            del rt.flows[flow.id]
            record_close(rt, flow)
    finally:
        if done is not None:
            done()


def refuse_over_capacity(rt: Runtime, lc: ListenerConfig, sock: socket.socket, peer: Any) -> None:
    """Reset a connection accepted past ``max_connections`` (``on_max_connections =
    "refuse"``) and record it like every close, without a task of its own."""
    flow = Flow(next_flow_id(), lc.name, "tcp", unmap(peer), ("", 0))
    try:
        flow.destination = unmap(sock.getsockname())
    except OSError:
        pass
    flow.close_reason = CloseReason.OVER_CAPACITY
    flow.error = f"listener at max_connections = {lc.max_connections}"
    abort_on_close(sock)
    sock.close()
    record_close(rt, flow)


async def _serve(
    rt: Runtime, lc: ListenerConfig, sock: socket.socket, flow: Flow, upstream: list[socket.socket]
) -> str:
    plugins = rt.plugins
    if lc.proxy_protocol:
        bad = await _read_proxy_header(lc, sock, flow)
        if bad:
            return bad

    if rt.opened_hook:
        plugins.opened(flow)

    if rt.admit_hook:
        refused = await refusal(rt, flow, "l4gw_admit")
        if refused:
            return _refuse(sock, refused)

    peeked = lc.name in rt.peek_hello
    no_hello = None
    if peeked:
        no_hello = await _peek_client_hello(lc, sock, flow)

    route = await choose_route(rt, flow)
    if isinstance(route, str):
        if route == CloseReason.NO_ROUTE and peeked:
            # SNI or ALPN routes exist here: say what the client's ClientHello offered.
            flow.error = no_route_reason(
                flow, no_hello, lc.name in rt.sni_routes, lc.name in rt.alpn_routes
            )
        return route
    cluster = route.cluster

    if rt.routed_hook:
        refused = await refusal(rt, flow, "l4gw_routed", route)
        if refused:
            return _refuse(sock, refused)

    source = (flow.client[0], 0) if cluster.upstream_source == "client" else None
    up = await connect_upstream(rt, route, flow, connect, source)
    if isinstance(up, str):
        if up == CloseReason.BACKEND_RESET:
            abort_on_close(sock)
        return up
    upstream.append(up)

    if cluster.proxy_protocol != "none":
        await _send_all(up, proxy_header(cluster, flow))

    idle = cluster.idle_timeout
    flow.tier = "copy"
    if rt.relay_hook:
        offer = plugins.offer("l4gw_relay", flow, sock, up, idle)
        if offer is not None:
            name, answer = offer
            handover = answer.__class__ is Handover
            if handover:
                # Copied here, in this frame, until it is handed over (Handover says why).
                at = flow.started_monotonic + answer.after_seconds
                promotion = Promotion(answer.after_bytes, at)
                closed = await rt.copy.run(sock, up, flow, idle, promotion, answer.counters)
                if closed is not None:
                    return closed
            before = flow.bytes_from_client + flow.bytes_to_client
            try:
                reason: str = await (answer.then(flow, sock, up, idle) if handover else answer)
                return reason
            except Exception as exc:
                if flow.bytes_from_client + flow.bytes_to_client != before:
                    log.exception("plugin %s: relay failed mid-flow", name)
                    flow.error = f"relay plugin {name}: {exc!r}"
                    return CloseReason.INTERNAL_ERROR
                log.warning("plugin %s: relay failed before any byte, copying: %r", name, exc)
                flow.tier = "copy"
    closed = await rt.copy.run(sock, up, flow, idle)
    assert closed is not None  # None only when a promotion was asked for
    return closed


def _refuse(sock: socket.socket, refused: tuple[str, bool]) -> str:
    reason, reset = refused
    if reset:
        abort_on_close(sock)
    return reason


async def _read_proxy_header(lc: ListenerConfig, sock: socket.socket, flow: Flow) -> str | None:
    """Consume and apply a PROXY v1/v2 header; a close reason when it is bad."""
    peer = ip_address(flow.client[0])
    if not any(peer in net for net in lc.proxy_protocol_trusted):
        flow.error = f"PROXY header expected from an untrusted source {flow.client[0]}"
        return CloseReason.BAD_PROXY_HEADER
    try:
        header = await peek(
            sock, proxy_protocol.parse, proxy_protocol.MAX_V2_LENGTH + 16, lc.peek_timeout
        )
        recv_exactly_queued(sock, header.length)
    except (PeekFailed, proxy_protocol.ProxyProtocolError) as exc:
        flow.error = f"bad PROXY header: {exc}"
        return CloseReason.BAD_PROXY_HEADER
    if header.command == "PROXY" and header.source and header.destination:
        flow.client, flow.destination = header.source, header.destination
    flow.traceparent_in = header.traceparent
    return None


_NOT_TLS = ClientHello(sni=None, alpn=())


def _parse_hello(cap: int) -> Callable[[bytes], ClientHello | int]:
    def parse(data: bytes) -> ClientHello | int:
        result = parse_client_hello(data, cap)
        return _NOT_TLS if result is None else result

    return parse


async def _peek_client_hello(lc: ListenerConfig, sock: socket.socket, flow: Flow) -> str | None:
    """Read SNI and ALPN into ``flow``; why there is no ClientHello, when there is none."""
    try:
        hello = await peek(sock, _parse_hello(lc.peek_max), lc.peek_max, lc.peek_timeout)
    except PeekFailed as exc:
        # Routes without an SNI or ALPN condition may still match.
        flow.add_event("peek_failed", reason=str(exc))
        return f"no TLS ClientHello ({exc})"
    flow.sni, flow.alpn = hello.sni, hello.alpn
    flow.add_event("peeked", sni=hello.sni or "", alpn=",".join(hello.alpn))
    return "not TLS" if hello is _NOT_TLS else None


_ALPN_SHOWN = 64
"""Characters of the offered ALPN list a refusal's reason shows: a ClientHello may
offer kilobytes of names, and the reason is one short log field."""


def no_route_reason(flow: Flow, no_hello: str | None, sni: bool, alpn: bool) -> str:
    """Why no route took a connection whose ClientHello was peeked, in one short string.

    Args:
        flow: peeked (``flow.sni``, ``flow.alpn`` as the client sent them).
        no_hello: why there is no ClientHello ("not TLS", ...), or None.
        sni: the listener has routes with an ``sni`` condition.
        alpn: the listener has routes with an ``alpn`` condition.

    Returns:
        E.g. ``no route for SNI "x", ALPN h2,http/1.1``, ``no SNI: not TLS`` or
        ``no ALPN: the ClientHello offers none``.
    """
    if no_hello:
        return f"no SNI: {no_hello}" if sni else f"no ALPN: {no_hello}"
    offered = ",".join(flow.alpn)
    if len(offered) > _ALPN_SHOWN:
        offered = offered[: _ALPN_SHOWN - 3] + "..."
    if not sni:
        return (
            f"no route for ALPN {offered}" if flow.alpn else "no ALPN: the ClientHello offers none"
        )
    text = (
        f'no route for SNI "{flow.sni}"'
        if flow.sni
        else "no SNI: the ClientHello has no server_name"
    )
    if alpn:
        text += f", ALPN {offered}" if flow.alpn else ", no ALPN"
    return text


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await wait_writable(sock)
