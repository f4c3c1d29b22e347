"""The connection's span as the OpenTelemetry API sees it while hooks run.

A sampled flow's SERVER span is never an SDK span in the gateway: it is a
flow record the exporter process turns into a span when the flow ends
(:mod:`gateway.telemetry.recorder`). So that a plugin can still use the
standard API inside a hook, the recorder gives every sampled flow a
:class:`FlowSpan` (``flow.span``), and the core makes it the current span
for the rest of the flow (:meth:`gateway.plugin_manager.Plugins.opened`
attaches it once the telemetry plugin's ``l4gw_connection_opened`` has set it,
:meth:`~gateway.plugin_manager.Plugins.closed` detaches it after the last
``l4gw_connection_closed``). Then ``trace.get_current_span()`` in a hook is the
connection's span, and a span a plugin (or a library instrumented with
OpenTelemetry) starts there is its child, in the same trace.

Rules kept here:

* **What a plugin writes lands on the SERVER span.** ``set_attribute`` and
  ``add_event`` write into the flow (``flow.set_attribute``, ``flow.add_event``),
  which the recorder copies into the flow record when the flow closes: the
  same way as the flow's own API. What cannot be recorded that way is ignored,
  never an error: the gateway names the span, sets its status from the close
  reason and ends it (``update_name``, ``set_status``, ``end`` and links do
  nothing); ``record_exception`` adds the semantic conventions' "exception" event.
* **Unsampled flows cost nothing.** Only a sampled flow gets a
  :class:`FlowSpan`; for the others ``flow.span`` stays None and the core's
  only work is reading that slot. With telemetry off this module is never
  imported (it imports the OpenTelemetry API).
* **One attach per flow, in the flow's own task.** Each connection and each
  UDP session is a trio task, and trio runs each task in its own copy of the
  context, so the span attached there is current for that flow's hooks only
  (:meth:`FlowSpan.attach`, :meth:`FlowSpan.detach`).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, TraceFlags, TraceState

if TYPE_CHECKING:
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.util.types import Attributes

    from gateway.flow import Flow

__all__ = ["FlowSpan", "current_flow_span"]


class FlowSpan(Span):
    """The SERVER span of one sampled flow, writing into the flow's record.

    Args:
        flow: the flow; attributes and events go to ``flow.set_attribute`` and
            ``flow.add_event`` (so ``flow.attributes`` and ``flow.events``).
        trace_id: the flow's trace id.
        span_id: the SERVER span's id (the flow record's).
        trace_state: the sampler's W3C ``tracestate``, if any.
    """

    __slots__ = ("_context", "_token", "_trace_state", "flow", "span_id", "trace_id")

    def __init__(self, flow: Flow, trace_id: int, span_id: int, trace_state: str | None) -> None:
        self.flow = flow
        self.trace_id = trace_id
        self.span_id = span_id
        self._trace_state = trace_state
        self._context: SpanContext | None = None
        self._token: Token[otel_context.Context] | None = None

    # --- what the core calls ---------------------------------------------------------------

    def attach(self) -> None:
        """Make this the current span in the calling task (the flow's own)."""
        if self._token is None:
            self._token = otel_context.attach(trace.set_span_in_context(self))

    def detach(self) -> None:
        """Restore the context from before :meth:`attach` (same task)."""
        token, self._token = self._token, None
        if token is not None:
            otel_context.detach(token)

    # --- the OpenTelemetry Span API ----------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            # Built on first use: most hooks never ask for it.
            state = TraceState.from_header([self._trace_state]) if self._trace_state else None
            context = self._context = SpanContext(
                self.trace_id,
                self.span_id,
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=state,
            )
        return context

    def is_recording(self) -> bool:
        return True

    def set_attribute(self, key: str, value: Any) -> None:
        self.flow.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.flow.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        flow = self.flow
        flow.events.append((name, dict(attributes or {})))
        flow.event_times.append(time.time_ns() if timestamp is None else timestamp)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # Semantic conventions: exceptions (exception.type, .message, .stacktrace).
        attrs: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
        }
        attrs.update(attributes or {})
        self.add_event("exception", attrs, timestamp)

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        pass  # a flow record carries no links

    def update_name(self, name: str) -> None:
        pass  # the gateway names the span ("tcp proxy", "udp proxy")

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        pass  # the gateway sets it from the close reason

    def end(self, end_time: int | None = None) -> None:
        pass  # the gateway ends it when the flow closes

    def __repr__(self) -> str:
        return f"FlowSpan(flow={self.flow.id}, trace_id={self.trace_id:032x})"


def current_flow_span() -> FlowSpan | None:
    """The flow whose hooks run now, as its span: None outside a sampled flow."""
    span = trace.get_current_span()
    return span if isinstance(span, FlowSpan) else None
