"""The values plugins see: a connection's context, a route, a refusal, a handover.

A :class:`Flow` is the one mutable record of a connection (or UDP session):
the core fills it in stage by stage and hands it to every hook. Plugins read
it and may add span attributes and events through :meth:`Flow.set_attribute`
and :meth:`Flow.add_event`; they never see its sockets (the relay hook is the
one exception, and it gets the sockets as separate arguments).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.relay.stats import RelayStats, TierCounters

if TYPE_CHECKING:
    import socket
    from collections.abc import Awaitable, Callable

    from gateway.config import ClusterConfig, Endpoint


class CloseReason:
    """Why a connection ended (the ``close_reason`` of logs, spans and metrics)."""

    CLIENT_EOF = "client_eof"
    BACKEND_EOF = "backend_eof"
    CLIENT_RESET = "client_reset"
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    CONNECT_FAILED = "connect_failed"
    REFUSED = "refused"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    """The routed cluster has no endpoint at all (discovery found none yet)."""
    DRAIN = "drain"
    BAD_PROXY_HEADER = "bad_proxy_header"
    PLUGIN_ERROR = "plugin_error"
    OVER_CAPACITY = "over_capacity"
    INTERNAL_ERROR = "internal_error"
    # UDP sessions
    SESSION_IDLE = "idle_timeout"
    BACKEND_UNREACHABLE = "backend_unreachable"

    #: reasons that mean the connection did not do what the client wanted
    FAILURES = frozenset(
        {
            CONNECT_FAILED,
            REFUSED,
            NO_ROUTE,
            NO_ENDPOINT,
            BAD_PROXY_HEADER,
            PLUGIN_ERROR,
            OVER_CAPACITY,
            INTERNAL_ERROR,
            BACKEND_UNREACHABLE,
        }
    )


KERNEL_TIERS = frozenset({"splice", "sockmap"})
"""The relay tiers that move bytes in the kernel (:attr:`Flow.spliced`)."""


def unmap(addr: Any) -> tuple[str, int]:
    """``(host, port)`` of a socket address, as a flow holds its addresses.

    An IPv6 address's flow info and scope id are dropped, and an IPv4-mapped
    IPv6 host (``::ffff:192.0.2.1``) becomes the IPv4 address it stands for:
    the same client reads the same, whichever socket family it came through.
    """
    host: str = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]


class Flow(RelayStats):
    """The context of one TCP connection or UDP session, as hooks see it.

    ``bytes_from_client`` and ``bytes_to_client`` (from RelayStats) count
    payload as it moves, whichever relay tier moves it. For a UDP session
    ``datagrams_from_client`` and ``datagrams_to_client`` count the datagrams
    forwarded each way (they stay 0 for TCP).
    """

    __slots__ = (
        "_trace_id",
        "alpn",
        "attributes",
        "client",
        "close_reason",
        "cluster",
        "datagrams_from_client",
        "datagrams_to_client",
        "destination",
        "ended",
        "endpoint",
        "error",
        "event_times",
        "events",
        "id",
        "listener",
        "refused_by",
        "refused_rule",
        "route",
        "sni",
        "span",
        "started",
        "started_monotonic",
        "tier",
        "traceparent_in",
        "traceparent_out",
        "transport",
    )

    def __init__(
        self,
        id: int,
        listener: str,
        transport: str,
        client: tuple[str, int],
        destination: tuple[str, int],
    ) -> None:
        # RelayStats.__init__, inline (one call less per flow).
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.id = id
        """Process-unique, increasing."""
        self.listener = listener
        """Name of the listener that accepted it."""
        self.transport = transport
        """"tcp" or "udp"."""
        self.client = client
        """(ip, port) of the real client (from the socket, or a trusted PROXY header)."""
        self.destination = destination
        """(ip, port) the client was connecting to: the original destination under TPROXY."""
        self.sni: str | None = None
        """TLS server name, when a route needed the ClientHello peeked."""
        self.alpn: tuple[str, ...] = ()
        """TLS ALPN protocols offered, when peeked."""
        self.route: str | None = None
        """Name of the route chosen."""
        self.cluster: str | None = None
        """Name of the cluster chosen."""
        self.endpoint: str | None = None
        """The backend address connected to ("ip:port")."""
        self.datagrams_from_client = 0
        """UDP: datagrams received from the client and sent upstream."""
        self.datagrams_to_client = 0
        """UDP: datagrams received from the upstream and sent to the client."""
        self.started = time.time()
        """Wall-clock start (seconds since the epoch)."""
        self.started_monotonic = time.monotonic()
        self.ended: float | None = None
        """Wall-clock end, set just before the closed hook."""
        self.close_reason: str | None = None
        """One of :class:`CloseReason`."""
        self.tier: str | None = None
        """Relay tier that moved the bytes last: "copy", "splice" or "sockmap"."""
        self.refused_by: str | None = None
        """Plugin that refused it (or "core")."""
        self.refused_rule: str | None = None
        """The rule that refused it, as the refusing plugin named it."""
        self.error: str | None = None
        """A short description of the error that ended it, if any."""
        self.traceparent_in: str | None = None
        """W3C traceparent received in a trusted PROXY v2 header's TRACEPARENT TLV, if
        any (the telemetry plugin makes it the parent of the flow's span)."""
        self._trace_id: str | int | None = None
        self.span: Any = None
        """The connection's span as the OpenTelemetry API sees it while it is sampled
        (set by the telemetry plugin when the flow opens), else None. The core makes
        it the current span for the flow's hooks (``trace.get_current_span()``);
        what a plugin sets on it lands on the flow's span (gateway/telemetry/context.py)."""
        self.traceparent_out: str | None = None
        """W3C traceparent to send upstream in the PROXY v2 TRACEPARENT TLV; set by the
        telemetry plugin (after a successful connect) for clusters that send one."""
        self.attributes: dict[str, Any] = {}
        """Span attributes added by plugins (:meth:`set_attribute`)."""
        self.events: list[tuple[str, dict[str, Any]]] = []
        """Span events ``(name, attributes)`` in order (:meth:`add_event`)."""
        self.event_times: list[int] = []
        """Wall-clock time (ns since the epoch) of each entry of ``events``, same index."""

    @property
    def trace_id(self) -> str | None:
        """Hex trace id of the connection's span when it is sampled (for access logs);
        set by the telemetry plugin when the connection opens, else None."""
        value = self._trace_id
        if value is None or isinstance(value, str):
            return value
        return format(value, "032x")

    @trace_id.setter
    def trace_id(self, value: str | int | None) -> None:
        # An int is formatted when read: most connections' trace ids never are,
        # and formatting one cost a traced connection about 1 µs in the gateway.
        self._trace_id = value

    @property
    def trace_parent(self) -> str | None:
        """The former name of :attr:`traceparent_in`, kept for plugins written against
        it; new code uses ``traceparent_in`` (the W3C spelling, as ``traceparent_out``)."""
        return self.traceparent_in

    @trace_parent.setter
    def trace_parent(self, value: str | None) -> None:
        self.traceparent_in = value

    @property
    def spliced(self) -> bool:
        """True when a kernel tier moved (some of) the bytes."""
        return self.tier in KERNEL_TIERS

    @property
    def duration(self) -> float:
        return (self.ended or time.time()) - self.started

    def set_attribute(self, key: str, value: Any) -> None:
        """Add an attribute to the connection's span; namespace keys (``myplugin.*``)."""
        self.attributes[key] = value

    def add_event(self, name: str, **attributes: Any) -> None:
        """Add an event, stamped with the current time, to the connection's span."""
        self.events.append((name, attributes))
        self.event_times.append(time.time_ns())

    def __repr__(self) -> str:
        return f"<Flow {self.id} {self.transport} {self.client} -> {self.destination}>"


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision: where an admitted connection goes.

    Attributes:
        name: the route's name (for logs and spans).
        cluster: the cluster's configuration.
        endpoints: the endpoints to try, in order; the core tries at most
            ``cluster.connect_attempts`` of them.
    """

    name: str
    cluster: ClusterConfig
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    """An admit hook's "no".

    Attributes:
        reason: short text for the log.
        rule: which rule refused (e.g. "per_client"), for logs and metrics.
        reset: close with RST instead of FIN.
    """

    reason: str
    rule: str = ""
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Handover:
    """An ``l4gw_relay`` answer: "copy this flow in the core first, then hand it to me".

    The core relays the flow in its own copy tier until ``after_bytes`` moved
    (both directions together) or the flow is ``after_seconds`` old, whichever
    comes first. If the flow is still open both ways then, with no byte held in
    userspace, the core awaits ``then(flow, client, upstream, idle_timeout)``
    for the rest of it: an awaitable as the hook's own would be (it returns the
    close reason). A flow that ends while copied never calls ``then``.

    Answer with one instance for every flow (make it when the configuration
    changes): the copy phase then runs no code of the plugin's, where a
    coroutine of its own around the core's copy relay costs every wakeup of
    the flow a frame, and its own clock reads and counting (3,900 instructions
    of a short connection's 272,000: bench/README.md).

    Attributes:
        after_bytes: hand over once this many bytes moved.
        after_seconds: hand over once the flow is this old (``Flow.started_monotonic``).
        then: takes the flow on; called at most once per flow.
        counters: the core counts the flow in these while it copies it
            (``flows_now``, ``flows_total``, the bytes it moved), or None.
    """

    after_bytes: int
    after_seconds: float
    then: Callable[[Flow, socket.socket, socket.socket, float], Awaitable[str]]
    counters: TierCounters | None = None
