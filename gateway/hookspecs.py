"""The plugin hook contract: l4gw's public API for plugin authors.

Every hook name starts with ``l4gw_``. Implement them with
``@gateway.hookimpl`` in a module (or object) that your package registers in
the ``l4gw.plugins`` entry-point group; the built-in plugins register exactly
the same way.

The hooks, in three kinds (README.md and docs/plugins.md list the same ones):

* **Lifecycle** (``l4gw_config_sections``, ``l4gw_configure``,
  ``l4gw_startup``, ``l4gw_reopen``, ``l4gw_shutdown``): called once per
  event, outside the connection path. Only ``l4gw_startup`` may be async.
* **Decisions** (``l4gw_admit``, ``l4gw_route``, ``l4gw_routed``,
  ``l4gw_relay``): called per connection, in plugin order (pluggy's: last
  registered first, ``tryfirst`` and ``trylast`` adjust); the first non-None
  result wins. An admit, route or routed implementation may be ``async def``
  or return an awaitable: the core awaits it before looking at the result,
  so an async None abstains like a synchronous one. (``l4gw_relay``'s
  awaitable is the relay itself: the core awaits it as the flow's relay.)
  Keep them fast: they run on the connection's path.
* **Observers** (``l4gw_connection_opened``, ``l4gw_connect_attempt``,
  ``l4gw_connection_closed``, ``l4gw_status``): called for every plugin, each one's error
  logged and isolated, so one failing observer cannot silence the others.
  They must not block; hand I/O to a task started from ``l4gw_startup``.

Every hook is called by l4gw's own drivers, not through pluggy's, so pluggy's
hook wrappers (``wrapper=True``, ``hookwrapper=True``) are refused when the
plugins load, and so is an ``async def`` implementation of a hook that is not
awaited (it would never run): the error names the plugin and the hook.

Lifecycle of a process: ``l4gw_config_sections`` before each validation of
the file; then, in each worker process, ``l4gw_configure`` and
``l4gw_startup`` once; on each reload (SIGHUP) ``l4gw_configure`` again, never
``l4gw_startup``; at the end ``l4gw_shutdown`` after the drain, then the
background tasks are cancelled. docs/plugins.md ("Lifecycle") tells the rest.

Tracing: during every hook of a sampled connection (from the telemetry plugin's
``l4gw_connection_opened``, which runs first, to the last ``l4gw_connection_closed``)
the OpenTelemetry current span is the connection's SERVER span (``flow.span``):
``trace.get_current_span()`` returns it, what is set on it lands on the
connection's span, and a span started in a hook is its child
(gateway/telemetry/context.py; docs/plugins.md, "Inside the connection's trace").

A UDP session is a flow like a TCP connection (``flow.transport == "udp"``):
opened, admit, route and routed run once, for its first datagram; later
datagrams follow the session without hook calls; closed runs when it ends.
The relay hook is TCP only.

What a raising plugin causes is defined per hook below. The core logs the
exception with the plugin's name every time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping
from socket import socket
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import trio

    from gateway.config import Config, Endpoint
    from gateway.flow import Flow, Handover, Refusal, Route
    from gateway.schema import Schema

PROJECT = "l4gw"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def l4gw_config_sections() -> Mapping[str, Schema] | None:
    """Declare the config sections this plugin reads.

    Called before each validation of the file (start-up, every reload,
    ``l4gw check``): return the same answer every time. Return ``{name:
    schema}``; the file's ``[plugin.<name>]`` table is then checked against
    ``schema`` (a mapping of key to :class:`gateway.Field`) and ``l4gw check``
    reports its problems with their key paths like the core's.

    A section the file leaves out gets the schema's defaults, unless a key of
    the schema is required (a Field without a default): then the plugin is not
    configured, and ``config.plugin("<name>")`` is empty. A ``[plugin.X]`` table
    that no plugin declares is an error, except when ``[gateway]
    disable_plugins`` names ``X``: it is ignored (with a note).

    Raises: a plugin raising here stops start-up (the error names the plugin).
    """


@hookspec
def l4gw_configure(config: Config) -> Iterable[str] | None:
    """Receive the validated configuration.

    Called in each worker process before ``l4gw_startup``, and again on every
    successful reload (SIGHUP), before new connections use the new config;
    connections already open keep the routing decisions made under the old one.
    Read your section with ``config.plugin("<name>")``: empty when the file leaves
    out a section whose schema has a required key (not configured: stay idle).
    Compile what you need and swap it in with one assignment. Must not block.

    Returns: None, or the per-connection hooks (``l4gw_connection_opened``,
    ``l4gw_admit``, ``l4gw_route``, ``l4gw_routed``, ``l4gw_connect_attempt``,
    ``l4gw_relay``, ``l4gw_connection_closed``) this plugin implements but has
    nothing to do for under ``config``, e.g. a rate limiter with no limit
    configured: ``{"l4gw_admit", "l4gw_routed", "l4gw_connection_closed"}``. The
    core does not call them for connections that start under this configuration
    (each call costs every connection CPU); a connection keeps the set it started
    with to its close, so a closed hook runs for exactly the connections whose
    opened, admit or connect it saw. Any other name is an error (as a raise).

    Raises: at start-up, start-up fails; on reload, the reload is abandoned and
    the running configuration stays.
    """


@hookspec
def l4gw_startup(config: Config, nursery: trio.Nursery) -> Awaitable[None] | None:
    """Start background work (health checks, log writers, store clients).

    Called once per worker process (``[gateway] workers``; a restarted worker
    calls it again), after ``l4gw_configure`` and before the listeners open;
    never on a reload. Start long-lived tasks in ``nursery``; they are
    cancelled at shutdown, after the drain and ``l4gw_shutdown``. May be async
    (awaited before the listeners open: use it to wait for a first health
    check, for example).

    Raises: start-up fails with the plugin's name in the error.
    """


@hookspec
def l4gw_connection_opened(flow: Flow) -> None:
    """Observe a new connection (or UDP session), before admission.

    ``flow`` has the listener, transport, client and original destination.
    Observer: must not block. Raises: logged; the connection goes on.
    """


@hookspec
def l4gw_admit(flow: Flow) -> Refusal | Awaitable[Refusal | None] | None:
    """Accept or refuse a new connection before any of its bytes are read.

    Return a :class:`gateway.Refusal` to refuse (the first one wins), None to
    let it through. Rate limits, ACLs and connection caps live here. A refused
    flow closes with reason ``refused``; the refusal's ``reason`` becomes
    ``flow.error`` and its ``rule`` ``flow.refused_rule`` (docs/plugins.md
    says where each shows up).

    Raises: with ``[gateway] admit_on_error = "closed"`` (default) the
    connection is refused with close reason ``plugin_error``; with "open" the
    raising plugin is skipped.
    """


@hookspec
def l4gw_route(flow: Flow, config: Config) -> Route | Awaitable[Route | None] | None:
    """Choose where an admitted connection goes.

    ``flow.sni``/``flow.alpn`` are set when a route of the listener matches on
    SNI or ALPN (the core peeked the ClientHello). Return a :class:`gateway.Route`
    (cluster and the endpoints to try, in order), or None to let the next
    plugin decide. When no plugin routes, the connection closes with reason
    ``no_route``: the gateway never forwards to a destination the config does
    not name.

    Raises: with ``[gateway] route_on_error = "closed"`` (default) the
    connection is refused (``plugin_error``); with "open" the next plugin is
    asked.
    """


@hookspec
def l4gw_routed(flow: Flow, route: Route) -> Refusal | Awaitable[Refusal | None] | None:
    """Accept or refuse a routed connection before anything is connected upstream.

    Called after ``l4gw_route`` chose ``route`` (``flow.route`` and
    ``flow.cluster`` are set), before the first connect attempt. Return a
    :class:`gateway.Refusal` to refuse (the first one wins), None to let it
    through. Limits that depend on the route or the cluster live here
    (per-route rates, per-cluster connection caps): ``l4gw_admit`` runs
    before routing and cannot know them. Keep it fast, like admit.

    Example::

        @hookimpl
        def l4gw_routed(flow, route):
            if route.cluster.name == "batch" and busy():
                return Refusal("batch cluster busy", rule="batch_busy")

    Raises: handled like ``l4gw_admit`` (``[gateway] admit_on_error``):
    refused with ``plugin_error`` when "closed", the plugin skipped when "open".
    """


@hookspec
def l4gw_connect_attempt(flow: Flow, endpoint: Endpoint, error: str | None, seconds: float) -> None:
    """Observe one upstream connect attempt: ``error`` is None on success.

    Passive health (outlier ejection) and connect-latency metrics use this.
    Observer: must not block. Raises: logged; the connection goes on.
    """


@hookspec
def l4gw_relay(
    flow: Flow, client: socket, upstream: socket, idle_timeout: float
) -> Awaitable[str] | Handover | None:
    """Take over moving the bytes of a routed, connected flow.

    The one hook that sees sockets: both are connected, non-blocking, and any
    PROXY header has been written. Return an awaitable that relays until the
    flow ends, keeps ``flow.bytes_from_client``/``flow.bytes_to_client`` and
    ``flow.tier`` current, and returns the close reason; or a
    :class:`~gateway.Handover`, to have the core copy the flow first and hand
    it over (to its ``then``, which returns such an awaitable) after so many
    bytes or seconds; or None to leave the flow to the core's userspace relay.
    Do not close the sockets: the core does.

    Raises: before any byte moved through the plugin's relay, the core's relay
    takes the flow; after, the flow closes with reason ``internal_error``.
    """


@hookspec
def l4gw_connection_closed(flow: Flow) -> None:
    """Observe the end of a connection; called exactly once per flow.

    Also for refused ones: ``flow.close_reason`` says why it ended,
    ``flow.refused_by``/``refused_rule`` who refused it, the byte counts and
    ``flow.ended`` are final. Access logs and metrics live here.
    Observer: must not block. Raises: logged; other observers still run.
    """


@hookspec
def l4gw_status() -> Mapping[str, Any] | None:
    """Report this plugin's state for the admin endpoint's ``/status``.

    Return a JSON-serialisable mapping (shown under the plugin's name), or
    None to show nothing. Called on the trio thread per request: cheap, must
    not block. Raises: logged; ``/status`` shows the error for this plugin.
    """


@hookspec
def l4gw_reopen() -> None:
    """Reopen files (SIGUSR1, for log rotation). Raises: logged."""


@hookspec
def l4gw_shutdown(config: Config) -> None:
    """The gateway is stopping: listeners are closed and the drain is over.

    Called once per worker process, before the background tasks started from
    ``l4gw_startup`` are cancelled (they are still running): flush what must
    not be lost. Must not block. Raises: logged; shutdown goes on.
    """
