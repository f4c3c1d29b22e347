"""A test-only plugin that uses the standard OpenTelemetry API inside hooks, as a
plugin with an instrumented client would: it never touches ``flow.span``.

In ``l4gw_admit`` it sets an attribute and an event on the current span, and
starts a span of its own ("spans.lookup") around a pretend lookup; in
``l4gw_route`` it notes the current span's trace id, so the test can compare it
with the connection's. Connections it does not sample see the API's invalid span.

It also sets a context variable of its own in ``l4gw_admit`` and never resets it, as a
careless plugin would, and notes whether the connection found one set already: each
connection starts in a context of its own, even in a task kept from an earlier
connection (gateway/taskpool.py), so none should.
"""

from __future__ import annotations

from contextvars import ContextVar

from opentelemetry import trace

from gateway import Flow, hookimpl

tracer = trace.get_tracer("l4gw-test-spans")
_admitted: ContextVar[int] = ContextVar("l4gw_test_spans_admitted")


@hookimpl
def l4gw_admit(flow: Flow) -> None:
    current = trace.get_current_span()
    current.set_attribute("spans.admit_recording", current.is_recording())
    current.set_attribute("spans.context_carried", _admitted.get(None) is not None)
    _admitted.set(flow.id)
    current.add_event("spans.admit", {"flow": flow.id})
    with tracer.start_as_current_span("spans.lookup") as span:
        span.set_attribute("spans.flow", flow.id)


@hookimpl
def l4gw_route(flow: Flow) -> None:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        trace.get_current_span().set_attribute("spans.route_trace", f"{context.trace_id:032x}")
