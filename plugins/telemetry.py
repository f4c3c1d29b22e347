"""Built-in telemetry: a span for every connection (or UDP session) and the gateway's metrics.

A thin adaptor from the hooks to :mod:`gateway.telemetry` (a semi-public
namespace), through the hook contract like any third-party plugin; what is
recorded, and the rules that keep it cheap, are
:mod:`gateway.telemetry.recorder`:

* ``l4gw_configure`` sets telemetry up on the first call (``[telemetry]``,
  ``OTEL_*``) and applies a reload's ``sample_ratio`` after it;
* ``l4gw_connection_opened`` (``tryfirst``) starts the flow's span, and gives a
  sampled flow its ``flow.span``: from there on the core makes it the current
  OpenTelemetry span during the flow's hooks (gateway/telemetry/context.py);
* ``l4gw_admit`` (``trylast``: it runs only once every other plugin let the
  connection through, and never refuses) stamps the "admitted" event;
* ``l4gw_connect_attempt`` notes each upstream attempt (and sets
  ``flow.traceparent_out`` for a cluster that sends one);
* ``l4gw_connection_closed`` (``trylast``: after every other plugin's, so what
  they add to the span is in it) records the flow, exactly once;
* ``l4gw_startup`` starts the span pipe's task (partial batches, the
  exporter's counts); ``l4gw_shutdown`` delivers what is left, bounded.

Off is free: with no exporter and no admin endpoint ``l4gw_configure`` declares
the per-connection hooks idle, and the core does not call them.

The entry point names this module; its hook functions are those of :data:`plugin`,
the instance it registers (tests make their own :class:`TelemetryPlugin`).
"""

from __future__ import annotations

import trio

from gateway import Config, Endpoint, Flow, hookimpl
from gateway.telemetry.recorder import FlowTelemetry, Recorder

_IDLE = frozenset(
    {"l4gw_connection_opened", "l4gw_admit", "l4gw_connect_attempt", "l4gw_connection_closed"}
)


class TelemetryPlugin:
    """The ``telemetry`` plugin: the hooks over one process's :class:`FlowTelemetry`.

    Args:
        telemetry: The flow telemetry to drive (default: a new one).
    """

    def __init__(self, telemetry: FlowTelemetry | None = None) -> None:
        self.telemetry = telemetry if telemetry is not None else FlowTelemetry()
        self.recorder: Recorder | None = None
        """``telemetry.recorder``, kept here for the per-connection hooks."""

    @hookimpl
    def l4gw_configure(self, config: Config) -> frozenset[str] | None:
        self.telemetry.configure(config)
        self.recorder = self.telemetry.recorder
        return _IDLE if self.recorder is None else None

    @hookimpl
    def l4gw_startup(self, config: Config, nursery: trio.Nursery) -> None:
        self.telemetry.start(nursery)

    @hookimpl
    def l4gw_shutdown(self, config: Config) -> None:
        self.telemetry.shutdown()

    @hookimpl(tryfirst=True)
    def l4gw_connection_opened(self, flow: Flow) -> None:
        recorder = self.recorder
        if recorder is not None:
            recorder.opened(flow)

    @hookimpl(trylast=True)
    def l4gw_admit(self, flow: Flow) -> None:
        recorder = self.recorder
        if recorder is not None:
            recorder.admitted(flow)

    @hookimpl
    def l4gw_connect_attempt(
        self, flow: Flow, endpoint: Endpoint, error: str | None, seconds: float
    ) -> None:
        recorder = self.recorder
        if recorder is not None:
            recorder.connect_attempt(flow, endpoint, error, seconds)

    @hookimpl(trylast=True)
    def l4gw_connection_closed(self, flow: Flow) -> None:
        recorder = self.recorder
        if recorder is not None:
            recorder.closed(flow)


plugin = TelemetryPlugin()
"""The instance the ``telemetry`` entry point registers."""
