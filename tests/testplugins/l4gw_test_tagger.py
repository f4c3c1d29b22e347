"""A test-only plugin that uses the span contract: attributes, events, a refusal.

Connections to the listener named "guarded" are refused with rule
"deny_all"; every connection gets a ``tagger.*`` attribute and event, with
values of the kinds plugins pass in practice (a string, a list, an object
that is neither, None).
"""

from __future__ import annotations

from gateway import Flow, Refusal, hookimpl


class _Opaque:
    def __str__(self) -> str:
        return "opaque-value"


@hookimpl
def l4gw_connection_opened(flow: Flow) -> None:
    flow.set_attribute("tagger.listener", flow.listener.upper())
    flow.set_attribute("tagger.object", _Opaque())
    flow.set_attribute("tagger.nothing", None)
    flow.add_event("tagger.seen", tags=["a", "b"], count=2)


@hookimpl
def l4gw_admit(flow: Flow) -> Refusal | None:
    if flow.listener == "guarded":
        return Refusal("guarded listener", rule="deny_all")
    return None
