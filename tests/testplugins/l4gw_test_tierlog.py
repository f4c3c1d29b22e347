"""A test-only observer: one log line per closed flow with its tier and span events.

Loaded through the entry point like any installed plugin, so an end-to-end test
sees what every other close-hook observer (access log, metrics, span) sees:
``tierlog conn=<id> tier=<tier> from_client=<n> to_client=<n> spliced=<tier|-> ...``.
"""

from __future__ import annotations

import logging

from gateway import Flow, hookimpl

log = logging.getLogger("l4gw.test.tierlog")


@hookimpl
def l4gw_connection_closed(flow: Flow) -> None:
    spliced = [attrs for name, attrs in flow.events if name == "spliced"]
    fallbacks = [attrs for name, attrs in flow.events if name == "relay_fallback"]
    log.warning(
        "tierlog conn=%d tier=%s from_client=%d to_client=%d spliced=%s bytes_before=%s "
        "fallbacks=%d reason=%s",
        flow.id,
        flow.tier,
        flow.bytes_from_client,
        flow.bytes_to_client,
        spliced[-1]["tier"] if spliced else "-",
        spliced[-1]["bytes_before"] if spliced else "-",
        len(fallbacks),
        flow.close_reason,
    )
