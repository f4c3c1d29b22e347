"""What every flow of the process shares, TCP connection or UDP session: the runtime,
the flow ids, and the one record of a closed flow.

This module sits below both transports (gateway/connection.py for TCP,
gateway/udp/ for UDP) and below the decisions they share (gateway/decisions.py):
it imports none of them.

Rules kept here:

* **A reload builds a new :class:`Runtime`; flows keep the one they started
  with.** What lives across reloads (the live flows, the log budget) is
  handed from one runtime to the next.
* **Flow ids are process-unique and increasing, over both transports**
  (:func:`next_flow_id`): a log line, a span and an access log entry name one
  flow by its id.
* **Every closed flow is recorded once, the same way** (:func:`record_close`):
  end time, the closed hook, then the log line. Failures always get a warning,
  within the log budget; other closes an info line when ``log_connections``
  is on.
* **The log budget bounds the gateway's own warning lines, not the record.**
  Every failed flow still reaches the closed hook (access log, metrics, span);
  a client opening thousands of junk connections a second would otherwise
  write thousands of lines a second. Per key (listener and close reason), at
  most :data:`LINES` lines are written per :data:`WINDOW` seconds; the first
  line after a window in which lines were held back says how many.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final

from gateway.config import Config
from gateway.flow import CloseReason, Flow
from gateway.plugin_manager import Plugins
from gateway.relay.copy import CopyRelay
from gateway.schema import format_address

_tcp_log = logging.getLogger("l4gw.conn")
_udp_log = logging.getLogger("l4gw.udp")

next_flow_id: Callable[[], int] = itertools.count(1).__next__
"""The id of a new flow: process-unique and increasing, shared by TCP and UDP."""


# --- the log budget -----------------------------------------------------------------------

LINES: Final = 20
WINDOW: Final = 10.0


class _Window:
    __slots__ = ("held", "start", "unreported", "written")

    def __init__(self, start: float) -> None:
        self.start = start
        self.written = 0
        self.held = 0
        """Lines held back in this window."""
        self.unreported = 0
        """Lines held back before, not yet reported by a written line."""


class LogBudget:
    """Per-key line budget (see the module docstring). Not thread-safe: one per trio loop."""

    __slots__ = ("_windows", "lines", "window")

    def __init__(self, lines: int = LINES, window: float = WINDOW) -> None:
        self.lines = lines
        self.window = window
        self._windows: dict[Hashable, _Window] = {}

    def allow(self, key: Hashable) -> int | None:
        """None when this line is to be held back; else how many lines like it
        were held back since the last one written (0 mostly)."""
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(now)
        elif now - w.start >= self.window:
            w.start, w.written, w.unreported, w.held = now, 0, w.unreported + w.held, 0
        if w.written >= self.lines:
            w.held += 1
            return None
        w.written += 1
        held, w.unreported = w.unreported, 0
        return held


def held_back(count: int) -> str:
    """The suffix of a line written after ``count`` like it were held back."""
    return f" ({count} more like it not logged)" if count else ""


# --- the runtime --------------------------------------------------------------------------


@dataclass(eq=False)
class Runtime:
    """What a flow needs, fixed when it starts: a reload builds a new one, and
    flows already open keep theirs."""

    config: Config
    plugins: Plugins
    copy: CopyRelay
    flows: dict[int, Flow]
    """Live flows of the process (shared across reloads; /connections reads it)."""
    budget: LogBudget = field(default_factory=LogBudget)
    """Bounds the failure lines of the log (shared across reloads)."""
    peek_hello: frozenset[str] = field(init=False)
    """Listeners with at least one SNI or ALPN route: only those peek the ClientHello."""
    sni_routes: frozenset[str] = field(init=False)
    """Listeners with at least one SNI route (a refusal's reason names the SNI)."""
    alpn_routes: frozenset[str] = field(init=False)
    """Listeners with at least one ALPN route (a refusal's reason names the ALPN)."""
    admit_open: bool = field(init=False)
    route_open: bool = field(init=False)
    opened_hook: bool = field(init=False)
    admit_hook: bool = field(init=False)
    routed_hook: bool = field(init=False)
    relay_hook: bool = field(init=False)
    attempt_hook: bool = field(init=False)
    closed_hook: bool = field(init=False)
    """Whether a plugin takes part in that hook under this config (none declared it
    idle, :meth:`Plugins.configure`): a hook nobody takes is not driven at all."""

    def __post_init__(self) -> None:
        self.sni_routes = frozenset(r.listener for r in self.config.routes if r.sni)
        self.alpn_routes = frozenset(r.listener for r in self.config.routes if r.alpn)
        self.peek_hello = self.sni_routes | self.alpn_routes
        self.admit_open = self.config.gateway.admit_on_error == "open"
        self.route_open = self.config.gateway.route_on_error == "open"
        self.opened_hook = self.plugins.implements("l4gw_connection_opened")
        self.admit_hook = self.plugins.implements("l4gw_admit")
        self.routed_hook = self.plugins.implements("l4gw_routed")
        self.relay_hook = self.plugins.implements("l4gw_relay")
        self.attempt_hook = self.plugins.implements("l4gw_connect_attempt")
        self.closed_hook = self.plugins.implements("l4gw_connection_closed")


# --- the record of a closed flow ----------------------------------------------------------


def record_close(rt: Runtime, flow: Flow, dropped: int = 0) -> None:
    """The one record of a closed flow: its end time, the closed hook, the log line.

    Args:
        rt: the runtime the flow started with.
        flow: closed, with its close reason; no longer in ``rt.flows``.
        dropped: UDP: the session's datagrams dropped (shown in its log line).
    """
    flow.ended = time.time()
    if rt.closed_hook or flow.span is not None:  # the span: Plugins.closed detaches it
        rt.plugins.closed(flow)
    if flow.close_reason not in CloseReason.FAILURES and not rt.config.gateway.log_connections:
        return  # close_line's usual answer, without the call
    line = close_line(rt, flow)
    if line is None:
        return
    level, suffix = line
    # For [gateway] log_format = "json" (gateway/logformat.py); a line is rare, budgeted.
    ids = {"connection_id": flow.id, "trace_id": flow.trace_id}
    if flow.transport == "udp":
        _udp_log.log(
            level,
            "udp session %d %s from_client=%d/%dB to_client=%d/%dB dropped=%d %.1fms %s%s%s",
            flow.id,
            where(flow),
            flow.datagrams_from_client,
            flow.bytes_from_client,
            flow.datagrams_to_client,
            flow.bytes_to_client,
            dropped,
            flow.duration * 1000,
            flow.close_reason,
            why(flow),
            suffix,
            extra=ids,
        )
    else:
        _tcp_log.log(
            level,
            "conn %d %s from_client=%d to_client=%d %.1fms %s%s%s",
            flow.id,
            where(flow),
            flow.bytes_from_client,
            flow.bytes_to_client,
            flow.duration * 1000,
            flow.close_reason,
            why(flow),
            suffix,
            extra=ids,
        )


def close_line(rt: Runtime, flow: Flow) -> tuple[int, str] | None:
    """Whether a closed flow gets a log line: (level, suffix), or None.

    Failures get a warning within the log budget (the suffix counts the lines held
    back before it); other closes an info line when ``log_connections`` is on.
    """
    if flow.close_reason not in CloseReason.FAILURES:
        return (logging.INFO, "") if rt.config.gateway.log_connections else None
    held = rt.budget.allow((flow.listener, flow.close_reason))
    return None if held is None else (logging.WARNING, held_back(held))


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
