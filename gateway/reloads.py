"""The reloads of one gateway process: the last one's outcome, counts by result.

A reload (SIGHUP, or ``watch_config`` which sends one) either puts a new
configuration in force or keeps the running one and says why. Operators ask
two things afterwards, without reading the log: did the last reload take,
and how often do reloads fail. ``/status`` answers the first (``reload``:
time, ``ok``, the error), the ``l4gw.reloads`` counter (``result`` = ``ok`` |
``error``) the second; and sd_notify tells systemd a reload began and ended.

Rules kept here:

* **Every reload is recorded once**, by :meth:`Reloads.begin` and then
  :meth:`Reloads.succeeded` or :meth:`Reloads.failed`.
* **The counter costs nothing between reloads**: an observable counter reads
  the two integers at collection time; none exists while telemetry is off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.sdnotify import Notifier, one_line

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from gateway.telemetry.providers import Telemetry

RESULTS = ("ok", "error")


@dataclass(frozen=True, slots=True)
class Reload:
    """The outcome of one reload."""

    time: float
    """When it ended (seconds since the epoch)."""
    ok: bool
    """The new configuration is in force."""
    error: str | None = None
    """Why the running configuration stayed (every problem, as logged)."""

    def document(self) -> dict[str, Any]:
        """As ``/status`` shows it."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        out: dict[str, Any] = {"time": stamp, "ok": self.ok}
        if self.error is not None:
            out["error"] = self.error
        return out


class Reloads:
    """Records the reloads of this process and tells systemd about them.

    Args:
        notifier: where sd_notify messages go (:func:`gateway.sdnotify.current`).
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.last: Reload | None = None
        self.counts = dict.fromkeys(RESULTS, 0)
        self._instrumented = False

    def begin(self) -> None:
        self.notifier.reloading()

    def succeeded(self, status: str) -> None:
        self._record(Reload(time.time(), True))
        self.notifier.ready(status)

    def failed(self, error: str) -> None:
        self._record(Reload(time.time(), False, error))
        self.notifier.ready(f"reload failed, the running config stays: {one_line(error)}")

    def status(self) -> dict[str, Any]:
        """``/status``'s ``reload``: the last reload and the counts."""
        out: dict[str, Any] = {"last": None if self.last is None else self.last.document()}
        out.update(self.counts)
        return out

    def instrument(self, telemetry: Telemetry | None) -> None:
        """The ``l4gw.reloads`` counter on ``telemetry``'s meter (once; none without it)."""
        if self._instrumented or telemetry is None or telemetry.meter is None:
            return
        self._instrumented = True
        telemetry.meter.create_observable_counter(
            "l4gw.reloads",
            [self._observe],
            unit="{reload}",
            description="Configuration reloads (SIGHUP, watch_config) by result: ok or error "
            "(the running config stayed)",
        )

    def _record(self, reload: Reload) -> None:
        self.last = reload
        self.counts["ok" if reload.ok else "error"] += 1

    def _observe(self, options: CallbackOptions) -> list[Observation]:
        from opentelemetry.metrics import Observation

        return [Observation(n, {"result": result}) for result, n in list(self.counts.items())]
