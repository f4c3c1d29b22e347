"""The shield's metrics, read at collection time from the table and the kernel counters.

* ``l4gw.shield.entries`` (gauge): live entries.
* ``l4gw.shield.changes`` (counter, ``l4gw.shield.action`` = add | remove |
  expire | evict): changes made by any worker (the shared journal counts them).
* ``l4gw.shield.drops`` (counter, ``l4gw.shield.source``): packets the kernel
  dropped, by the source of the entry that matched ("ratelimit", "acl",
  "admin", a plugin's name). By source, not by the free-text reason, so the
  series stay few; an entry's reason is in ``/shield`` and in its log lines.
* ``l4gw.shield.packets`` (counter, ``l4gw.shield.verdict`` = passed |
  dropped): what the kernel program saw, summed over CPUs (absent while the
  kernel shield is off).

They are the gateway's numbers, not a worker's: only the reporting process
(worker 0, :attr:`gateway.shield.table.Shield.reporter`) yields points, so a
sum over workers counts them once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.shield import table

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Meter, Observation


def register(meter: Meter) -> None:
    """Create the shield's observable instruments on ``meter``."""
    from opentelemetry.metrics import Observation

    def reporting() -> table.Shield | None:
        shield = table.installed()
        return shield if shield is not None and shield.reporter else None

    def entries(options: CallbackOptions) -> Sequence[Observation]:
        shield = reporting()
        return [] if shield is None else [Observation(len(shield))]

    def changes(options: CallbackOptions) -> Sequence[Observation]:
        shield = reporting()
        if shield is None:
            return []
        changes = shield.status_changes()
        return [Observation(changes[a], {"l4gw.shield.action": a}) for a in table.ACTIONS]

    def drops(options: CallbackOptions) -> Sequence[Observation]:
        shield = reporting()
        if shield is None or shield.kernel is None:
            return []
        return [
            Observation(n, {"l4gw.shield.source": source})
            for source, n in sorted(shield.drops_by_source().items())
        ]

    def packets(options: CallbackOptions) -> Sequence[Observation]:
        shield = reporting()
        counters = None if shield is None else shield.counters()
        if counters is None:
            return []
        return [
            Observation(counters[0], {"l4gw.shield.verdict": "passed"}),
            Observation(counters[1], {"l4gw.shield.verdict": "dropped"}),
        ]

    meter.create_observable_gauge(
        "l4gw.shield.entries", [entries], unit="{entry}", description="Entries in the shield"
    )
    meter.create_observable_counter(
        "l4gw.shield.changes",
        [changes],
        unit="{change}",
        description="Shield entries added, removed, expired and evicted (by action)",
    )
    meter.create_observable_counter(
        "l4gw.shield.drops",
        [drops],
        unit="{packet}",
        description="New connections (SYNs, UDP datagrams) the kernel shield dropped, by the "
        "source of the entry",
    )
    meter.create_observable_counter(
        "l4gw.shield.packets",
        [packets],
        unit="{packet}",
        description="Packets the kernel shield program passed and dropped",
    )
