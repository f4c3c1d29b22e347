"""The relay tier policy: which tier moves a flow's bytes, decided on plain values.

Three tiers per flow (DESIGN.md, "Relay tiers"): ``copy`` (the core's trio relay,
:mod:`gateway.relay.copy`), ``splice`` (splice(2) through a pipe per direction, no
privileges, :mod:`gateway.relay.splice`) and ``sockmap`` (the kernel redirects each
side's bytes to the other, :mod:`gateway.relay.sockmap`). ``[plugin.relay] tiers``
lists them in order of preference. A flow starts in ``copy`` and is promoted once it
has moved ``promote_after_bytes`` or lived ``promote_after``; a threshold of 0
promotes at once.

This module is the section's schema and the decisions on it: no I/O, no trio. The
start-up probing is :mod:`gateway.relay.probe`, the per-process tiers that act on
these decisions :mod:`gateway.relay.tiers`, and the ``relay`` plugin only connects
those to the hooks.

Rules kept here:

1. **``copy`` is always the last resort.** :func:`plan` never lists it; a flow that no
   kernel tier takes stays in (or goes back to) the copy tier.
2. **Only enabled tiers, in the configured order.** A flow tries the kernel tiers
   whose self-test passed, in the order of ``tiers``; a bulk flow skips sockmap for
   splice unless ``sockmap_for_bulk`` (:func:`tiers_for`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import gateway.schema as s
from gateway.schema import Field, Invalid

TIERS: Final = ("sockmap", "splice", "copy")
KERNEL_TIERS: Final = ("sockmap", "splice")
#: The default preference order, from bench/relay_tiers.py (docs/accelerator.md):
#: sockmap moved request/response about twice as fast as splice or copy (and faster
#: than HAProxy) at a tenth of the CPU, so long-lived flows go there when the host
#: allows it; bulk flows go to splice (``sockmap_for_bulk``), which matched or beat
#: sockmap's throughput at two thirds of its CPU; both beat copy. Without the
#: privileges for BPF the sockmap tier is simply off (one info line at start-up).
DEFAULT_TIERS: Final = ("sockmap", "splice", "copy")
DEFAULT_STATUS_DIR: Final = "/run/l4gw"
#: Bytes over which a promoted flow's rate is measured (Policy.is_bulk).
BULK_WINDOW: Final = 256 << 10


def _tiers(value: Any) -> tuple[str, ...]:
    tiers: tuple[str, ...] = s.list_of(s.choice(*TIERS), min_items=1)(value)
    if len(set(tiers)) != len(tiers):
        raise Invalid("a tier is listed twice")
    if "copy" in tiers and tiers[-1] != "copy":
        raise Invalid('"copy" is the last resort of every flow: list it last, or leave it out')
    return tiers if tiers[-1] == "copy" else (*tiers, "copy")


SCHEMA: Final[Mapping[str, Field]] = {
    "tiers": Field(
        _tiers,
        DEFAULT_TIERS,
        'relay tiers in order of preference, from "sockmap", "splice", "copy" '
        '(copy is always the last resort; ["copy"] turns the plugin off)',
    ),
    "promote_after_bytes": Field(
        s.size, 256 * 1024, "promote a flow out of copy once it moved this much (0: at once)"
    ),
    "promote_after": Field(
        # 100 ms measured 3-8 % more keepalive requests/s than 1 s (bench/README.md,
        # "Keepalive and the promotion delay"); short connections still never leave copy.
        s.duration,
        0.1,
        "promote a flow out of copy once it is this old (0: at once)",
    ),
    "bulk_rate": Field(
        s.size,
        16 << 20,
        "a promoted flow that moves at least this many bytes per second (measured "
        "over its next 256 KiB) is bulk",
    ),
    "sockmap_for_bulk": Field(
        s.boolean,
        False,
        "also give sockmap the bulk flows (by default they go to splice, which moved "
        "bulk as fast at less CPU in our measurements: docs/accelerator.md)",
    ),
    "sockmap_object": Field(
        s.string, "", "the BPF object of the sockmap tier (default: the one installed)"
    ),
    "sockmap_max_flows": Field(
        s.integer(1, 1 << 20), 4096, "flows the sockmap tier holds at once; more go to the next"
    ),
    "sockmap_high_watermark": Field(
        s.size,
        4 << 20,
        "most bytes one direction may queue in the kernel's redirect path; "
        "beyond, the sender is held back through its TCP window",
    ),
    "sockmap_hard_cap": Field(
        s.size, 256 << 20, "redirect backlog at which a flow is reset (a safety net)"
    ),
    "self_test_timeout": Field(s.duration, 10.0, "upper bound of each tier's start-up canary"),
    "status_dir": Field(
        s.string,
        DEFAULT_STATUS_DIR,
        'where the gateway publishes <pid>.json for "l4gw accel status" ("": nowhere)',
    ),
}
"""The ``[plugin.relay]`` section (declared by the ``relay`` plugin)."""


def defaults() -> dict[str, Any]:
    """The ``[plugin.relay]`` section of a configuration that does not mention it."""
    return {key: f.default for key, f in SCHEMA.items()}


def setting(section: Mapping[str, Any], key: str) -> Any:
    """``section[key]``, or the schema's default when the section lacks it."""
    return section.get(key, SCHEMA[key].default)


@dataclass(frozen=True, slots=True)
class Policy:
    """What ``[plugin.relay]`` asks for.

    Attributes:
        tiers: Preference order, always ending with "copy".
        after_bytes: Promote once this many bytes moved (both directions).
        after_seconds: Promote once the flow is this old.
        sockmap_for_bulk: Whether bulk flows may use sockmap.
        bulk_rate: Bytes per second (over the copy phase) that make a flow bulk.
    """

    tiers: tuple[str, ...]
    after_bytes: int
    after_seconds: float
    sockmap_for_bulk: bool = False
    bulk_rate: int = 16 << 20
    immediate: bool = field(init=False, compare=False, repr=False)
    """Either threshold is 0: the flow is handed over before any byte is copied (a
    field, not a property: read per flow)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "immediate", self.after_bytes == 0 or self.after_seconds == 0)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> Policy:
        return cls(
            setting(section, "tiers"),
            setting(section, "promote_after_bytes"),
            setting(section, "promote_after"),
            setting(section, "sockmap_for_bulk"),
            setting(section, "bulk_rate"),
        )

    def is_bulk(self, moved: int, seconds: float) -> bool:
        """Whether a flow that moved ``moved`` bytes in ``seconds`` is bulk.

        Measured right after the promotion, over :data:`BULK_WINDOW`: a chatty
        request/response flow reaches ``after_bytes`` too, but slowly (a 64-byte
        ping-pong moves about 2 MB/s); a transfer moves the window in a millisecond.
        """
        return moved >= self.bulk_rate * max(seconds, 1e-3)


def plan(tiers: tuple[str, ...], enabled: frozenset[str]) -> tuple[str, ...]:
    """The kernel tiers a promoted flow tries, in order; () means "leave flows to the core".

    Args:
        tiers: The configured preference order.
        enabled: Kernel tiers whose self-test passed.
    """
    return tuple(t for t in tiers if t in KERNEL_TIERS and t in enabled)


def tiers_for(plan_: tuple[str, ...], bulk: bool, sockmap_for_bulk: bool) -> tuple[str, ...]:
    """The kernel tiers one promoted flow tries.

    A bulk flow (:meth:`Policy.is_bulk`) skips sockmap, unless ``sockmap_for_bulk``,
    when splice is there to take it: on the measured host splice moved bulk as fast
    at less CPU, while sockmap won request/response.

    Args:
        plan_: The enabled kernel tiers in preference order.
        bulk: The flow is bulk.
        sockmap_for_bulk: The policy's ``sockmap_for_bulk``.
    """
    if bulk and not sockmap_for_bulk and "splice" in plan_:
        return tuple(t for t in plan_ if t != "sockmap")
    return plan_


def fallback(tiers: tuple[str, ...], enabled: frozenset[str], tier: str) -> str:
    """The tier that flows use when ``tier`` is not available."""
    after = tiers[tiers.index(tier) + 1 :] if tier in tiers else tiers
    return next((t for t in after if t == "copy" or t in enabled), "copy")
