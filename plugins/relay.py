"""Relay tiers: move an established flow's bytes with splice(2) or the eBPF sockmap.

Three tiers per flow (DESIGN.md, "Relay tiers"): ``copy`` (the core's trio relay),
``splice`` (splice(2) through a pipe per direction, no privileges) and ``sockmap``
(gateway/relay/sockmap.py: the kernel redirects each side's bytes to the other).
``[plugin.relay] tiers`` lists them in order of preference. A flow starts in
``copy`` and is promoted once it has moved ``promote_after_bytes`` or lived
``promote_after`` (checked when bytes move: an idle flow costs nothing where it
is); a threshold of 0 promotes at once.

Rules kept here:

1. **Zero cost when off.** With no kernel tier enabled, :func:`l4gw_relay`
   returns None and the core relays the flow exactly as without this plugin.
2. **Self-test before use, once, off the connection path.** ``l4gw_startup``
   loads each listed kernel tier and runs its canary flow over loopback in a
   worker thread; a tier is enabled only if its canary passed. Otherwise one
   warning says why and which tier the flows use instead.
3. **Hand over only what is whole.** A flow leaves ``copy`` only when
   :meth:`CopyRelay.run` reports it promoted: both directions open, no byte held
   in userspace. A kernel tier that cannot take the flow (sockmap's ArmError)
   hands it to the next enabled tier; ``copy`` is always the last one.
4. **Counts land on the flow.** Every tier updates ``flow.bytes_from_client`` and
   ``flow.bytes_to_client`` in place (sockmap: the verdict program's per-cookie
   counters, cross-checked with TCP_INFO), so the close hook, the access log and
   the span see the totals; ``flow.tier`` is the tier that moved bytes last, and
   the span gets a ``spliced`` event when a kernel tier takes the flow.
5. **Nothing outlives the process.** The accelerator pins nothing and attaches
   through a bpf_link (gone with the process, kill -9 included); it is closed at
   shutdown. The status file (``<status_dir>/<pid>.json``, for ``l4gw accel
   status``) is removed at exit, and the next start removes those of dead
   processes and any ``l4gw*`` pin left under /sys/fs/bpf.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from gateway import CloseReason, Config, Field, Flow, Invalid, hookimpl
from gateway import schema as s
from gateway.relay.copy import CopyRelay, Promotion
from gateway.relay.sockmap import Accelerator, AcceleratorError, ArmError, FlowReport, Limits
from gateway.relay.splice import splice_relay, splice_self_test

log = logging.getLogger("l4gw.relay")

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
BPFFS: Final = Path("/sys/fs/bpf")
_PUBLISH_EVERY: Final = 1.0
#: Bytes over which a promoted flow's rate is measured (Policy.is_bulk).
BULK_WINDOW: Final = 256 << 10
# Accelerator.relay's own abort reasons; the core knows them as internal errors.
_SOCKMAP_ABORTS: Final = frozenset({"backlog_cap", "drain_timeout", "anomaly"})


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
        s.duration, 1.0, "promote a flow out of copy once it is this old (0: at once)"
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


# --- decisions (plain values) --------------------------------------------------------


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

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> Policy:
        values = {key: section.get(key, f.default) for key, f in SCHEMA.items()}
        return cls(
            values["tiers"],
            values["promote_after_bytes"],
            values["promote_after"],
            values["sockmap_for_bulk"],
            values["bulk_rate"],
        )

    def is_bulk(self, moved: int, seconds: float) -> bool:
        """Whether a flow that moved ``moved`` bytes in ``seconds`` is bulk.

        Measured right after the promotion, over :data:`BULK_WINDOW`: a chatty
        request/response flow reaches ``after_bytes`` too, but slowly (a 64-byte
        ping-pong moves about 2 MB/s); a transfer moves the window in a millisecond.
        """
        return moved >= self.bulk_rate * max(seconds, 1e-3)

    @property
    def immediate(self) -> bool:
        """Either threshold is 0: the flow is handed over before any byte is copied."""
        return self.after_bytes == 0 or self.after_seconds == 0


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


def limits_from(section: Mapping[str, Any]) -> Limits:
    def get(key: str) -> Any:
        return section.get(key, SCHEMA[key].default)

    return Limits(
        high_watermark=get("sockmap_high_watermark"),
        hard_cap=get("sockmap_hard_cap"),
    )


@dataclass
class TierCounters:
    """Flows and bytes of one tier in this process.

    Attributes:
        flows_now: Flows in this tier right now.
        flows_total: Flows that entered this tier (a promoted flow counts in
            ``copy`` and in the tier that took it over).
        bytes: Payload bytes moved while flows were in this tier (both directions).
    """

    flows_now: int = 0
    flows_total: int = 0
    bytes: int = 0


@dataclass
class TierState:
    """Whether a tier may be used, and why not."""

    configured: bool = False
    enabled: bool = False
    why_not: str | None = "not loaded yet"
    self_test: str = "not run"
    self_test_seconds: float | None = None
    counters: TierCounters = field(default_factory=TierCounters)


# --- probing (synchronous; start-up thread and the CLI) ------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """The outcome of loading and self-testing one tier.

    Attributes:
        tier: "sockmap" or "splice".
        error: None when usable, else one line saying why not.
        seconds: How long load plus canary took.
        accelerator: The loaded, tested accelerator (sockmap only, when usable);
            the caller owns and closes it.
    """

    tier: str
    error: str | None
    seconds: float
    accelerator: Accelerator | None = None


def probe(tier: str, section: Mapping[str, Any]) -> Probe:
    """Load ``tier`` and run its canary flow; blocking, for a worker thread or the CLI."""
    start = time.monotonic()
    timeout = float(section.get("self_test_timeout", SCHEMA["self_test_timeout"].default))
    if tier == "splice":
        error = splice_self_test(timeout)
        return Probe(tier, error, time.monotonic() - start)
    path = section.get("sockmap_object") or None
    try:
        acc = Accelerator.load(
            path,
            max_flows=int(section.get("sockmap_max_flows", SCHEMA["sockmap_max_flows"].default)),
            limits=limits_from(section),
        )
    except AcceleratorError as exc:
        return Probe(tier, str(exc), time.monotonic() - start)
    error = acc.self_test(timeout)
    if error is not None:
        acc.close()
        return Probe(tier, f"sockmap self-test: {error}", time.monotonic() - start)
    return Probe(tier, None, time.monotonic() - start, acc)


def remove_stale(status_dir: Path | None) -> list[str]:
    """Remove what a gateway that died without cleaning up left: status files of dead
    processes and ``l4gw*`` pins under /sys/fs/bpf. Returns what was removed."""
    removed: list[str] = []
    if status_dir is not None and status_dir.is_dir():
        for path in status_dir.glob("*.json"):
            if path.stem.isdigit() and not pid_alive(int(path.stem)):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(str(path))
    # The accelerator never pins; a pin can only come from an older or foreign build,
    # and it would keep maps alive forever.
    with contextlib.suppress(OSError):
        for pin in BPFFS.glob("l4gw*"):
            with contextlib.suppress(OSError):
                pin.unlink()
                removed.append(str(pin))
    return removed


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# --- the plugin ----------------------------------------------------------------------


class RelayTiers:
    """The plugin's state: policy, loaded tiers, counters. One per process."""

    def __init__(self) -> None:
        self.section: Mapping[str, Any] = {}
        self.policy = Policy(DEFAULT_TIERS, SCHEMA["promote_after_bytes"].default, 1.0)
        self.tiers = {name: TierState() for name in TIERS}
        self.tiers["copy"] = TierState(configured=True, enabled=True, why_not=None)
        self.tiers["copy"].self_test = "not needed"
        self.accelerator: Accelerator | None = None
        self.plan: tuple[str, ...] = ()
        self.started = False
        self.promotions = 0
        self.fallbacks = 0
        self.copy = CopyRelay(65536)
        self._buffer_size = 65536
        self.status_path: Path | None = None
        self.config_path = ""
        self.tiers_explicit = False
        self.status_dir_explicit = False

    # lifecycle --------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        self.section = config.plugin("relay")
        self.config_path = config.path
        raw = config.raw.get("plugin", {}).get("relay", {})
        self.tiers_explicit = isinstance(raw, Mapping) and "tiers" in raw
        self.status_dir_explicit = isinstance(raw, Mapping) and "status_dir" in raw
        new = Policy.from_section(self.section)
        if self.started:
            late = [t for t in new.tiers if t in KERNEL_TIERS and t not in self.policy.tiers]
            if late:
                log.warning("relay: tiers %s added by the reload take effect at restart", late)
        self.policy = new
        for name in KERNEL_TIERS:
            self.tiers[name].configured = name in new.tiers
        if config.gateway.buffer_size != self._buffer_size:
            self._buffer_size = config.gateway.buffer_size
            self.copy = CopyRelay(self._buffer_size)
        self._replan()

    def _replan(self) -> None:
        enabled = frozenset(t for t in KERNEL_TIERS if self.tiers[t].enabled)
        self.plan = plan(self.policy.tiers, enabled) if self.started else ()

    async def startup(self, nursery: trio.Nursery) -> None:
        status_dir = str(self.section.get("status_dir", DEFAULT_STATUS_DIR))
        removed = await trio.to_thread.run_sync(
            remove_stale, Path(status_dir) if status_dir else None
        )
        for what in removed:
            log.info("relay: removed %s left by a gateway that is gone", what)
        for name in KERNEL_TIERS:
            state = self.tiers[name]
            if name not in self.policy.tiers:
                state.why_not = "not in [plugin.relay] tiers"
                continue
            result = await trio.to_thread.run_sync(probe, name, self.section)
            state.self_test_seconds = round(result.seconds, 3)
            if result.error is None:
                state.enabled, state.why_not, state.self_test = True, None, "passed"
                self.accelerator = result.accelerator or self.accelerator
            else:
                state.why_not, state.self_test = result.error, f"failed: {result.error}"
        enabled = frozenset(t for t in KERNEL_TIERS if self.tiers[t].enabled)
        for name in KERNEL_TIERS:
            state = self.tiers[name]
            if state.configured and not state.enabled:
                # A tier the operator asked for is a warning; the default list
                # trying sockmap on a host that does not allow BPF is not.
                log.log(
                    logging.WARNING if self.tiers_explicit else logging.INFO,
                    "relay: %s tier disabled: %s; flows use %s instead",
                    name,
                    state.why_not,
                    fallback(self.policy.tiers, enabled, name),
                )
        self.started = True
        self._replan()
        p = self.policy
        if self.plan:
            log.info(
                "relay: tiers %s; promotion after %s bytes or %gs",
                " > ".join((*self.plan, "copy")),
                p.after_bytes,
                p.after_seconds,
            )
        if status_dir:
            self.status_path = Path(status_dir) / f"{os.getpid()}.json"
            nursery.start_soon(self._publish_loop)

    def shutdown(self) -> None:
        self.plan = ()
        if self.accelerator is not None:
            self.accelerator.close()
            self.accelerator = None
            self.tiers["sockmap"].enabled = False
            self.tiers["sockmap"].why_not = "stopped"
        self._unpublish()

    # status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        tiers: dict[str, Any] = {}
        for name, state in self.tiers.items():
            c = state.counters
            entry: dict[str, Any] = {
                "configured": state.configured,
                "enabled": state.enabled,
                "why_not": state.why_not,
                "self_test": state.self_test,
                "self_test_seconds": state.self_test_seconds,
                "flows_now": c.flows_now,
                "flows_total": c.flows_total,
                "bytes": c.bytes,
            }
            if name == "sockmap" and self.accelerator is not None:
                entry["accelerator"] = self.accelerator.status()
            tiers[name] = entry
        return {
            "pid": os.getpid(),
            "config": self.config_path,
            "updated": time.time(),
            "active": bool(self.plan),
            "policy": {
                "tiers": list(self.policy.tiers),
                "promote_after_bytes": self.policy.after_bytes,
                "promote_after": self.policy.after_seconds,
                "sockmap_for_bulk": self.policy.sockmap_for_bulk,
                "bulk_rate": self.policy.bulk_rate,
            },
            "tiers": tiers,
            "promotions": self.promotions,
            "fallbacks": self.fallbacks,
        }

    def _publish(self) -> None:
        path = self.status_path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status(), indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            # The default directory is not writable for an unprivileged gateway:
            # that is expected and only costs "l4gw accel status" its counters.
            log.log(
                logging.WARNING if self.status_dir_explicit else logging.INFO,
                "relay: cannot publish the status in %s (l4gw accel status will not "
                "see this gateway's counters): %s",
                path.parent,
                exc.strerror or exc,
            )
            self.status_path = None

    def _unpublish(self) -> None:
        if self.status_path is not None:
            with contextlib.suppress(OSError):
                self.status_path.unlink()
            self.status_path = None

    async def _publish_loop(self) -> None:
        try:
            while self.status_path is not None:
                self._publish()
                await trio.sleep(_PUBLISH_EVERY)
        finally:
            self._unpublish()

    # the relay --------------------------------------------------------------------

    async def relay(
        self, flow: Flow, client: socket.socket, upstream: socket.socket, idle_timeout: float
    ) -> str:
        policy, tiers = self.policy, self.plan
        if not policy.immediate:
            age = time.monotonic() - flow.started_monotonic
            at = trio.current_time() + policy.after_seconds - age
            promotion = Promotion(policy.after_bytes, at)
            with self._in(flow, "copy"):
                closed = await self.copy.run(client, upstream, flow, idle_timeout, promotion)
                if closed is None and tiers_for(tiers, True, policy.sockmap_for_bulk) != tiers:
                    # Whether it is bulk decides the tier: watch how fast it moves now
                    # (its average would count the think time of a request/response
                    # flow, or the quiet start of a download).
                    closed, bulk = await self._measure(client, upstream, flow, idle_timeout)
                    tiers = tiers_for(tiers, bulk, policy.sockmap_for_bulk)
            if closed is not None:
                return closed
            self.promotions += 1
        idle = idle_timeout or None
        for tier in tiers:
            if tier == "sockmap":
                acc = self.accelerator
                if acc is None:
                    continue
                report = FlowReport()
                with self._in(flow, "sockmap", entered=False) as enter:
                    try:
                        reason = await acc.relay(
                            client, upstream, flow, idle_timeout=idle, on_armed=enter,
                            report=report,
                        )  # fmt: skip
                    except ArmError as exc:
                        self.fallbacks += 1
                        flow.add_event("relay_fallback", tier="sockmap", reason=str(exc))
                        continue
                    finally:
                        if report.kernel_bytes or report.held_bytes:
                            flow.set_attribute("l4gw.sockmap.kernel_bytes", report.kernel_bytes)
                            flow.set_attribute("l4gw.sockmap.held_bytes", report.held_bytes)
                            flow.set_attribute("l4gw.sockmap.holds", report.holds)
                            flow.set_attribute("l4gw.sockmap.max_backlog", report.max_backlog)
                if reason in _SOCKMAP_ABORTS:
                    flow.error = f"sockmap tier aborted the flow: {reason}"
                    return CloseReason.INTERNAL_ERROR
                return reason
            with self._in(flow, "splice"):
                return await splice_relay(client, upstream, flow, idle_timeout=idle)
        with self._in(flow, "copy"):
            closed = await self.copy.run(client, upstream, flow, idle_timeout)
        assert closed is not None
        return closed

    async def _measure(
        self, client: socket.socket, upstream: socket.socket, flow: Flow, idle_timeout: float
    ) -> tuple[str | None, bool]:
        """Copy on until the flow moved ``BULK_WINDOW`` more bytes or the time that
        takes at ``bulk_rate`` passed; returns (close reason or None, bulk)."""
        policy = self.policy
        began, before = trio.current_time(), flow.bytes_from_client + flow.bytes_to_client
        window = Promotion(before + BULK_WINDOW, began + BULK_WINDOW / policy.bulk_rate)
        closed = await self.copy.run(client, upstream, flow, idle_timeout, window)
        moved = flow.bytes_from_client + flow.bytes_to_client - before
        return closed, policy.is_bulk(moved, trio.current_time() - began)

    @contextlib.contextmanager
    def _in(self, flow: Flow, tier: str, entered: bool = True) -> Any:
        """Count ``flow`` in ``tier`` while the block runs; with ``entered=False`` the
        flow enters only when the yielded callable is called (sockmap: once armed)."""
        c = self.tiers[tier].counters
        before = flow.bytes_from_client + flow.bytes_to_client
        inside = False

        def enter() -> None:
            nonlocal inside
            inside = True
            c.flows_now += 1
            c.flows_total += 1
            flow.tier = tier
            if tier != "copy":
                flow.add_event("spliced", tier=tier, bytes_before=before)

        if entered:
            enter()
        try:
            yield enter
        finally:
            if inside:
                c.flows_now -= 1
                c.bytes += flow.bytes_from_client + flow.bytes_to_client - before


_plugin = RelayTiers()


def status() -> dict[str, Any]:
    """The relay tiers of this process, for the admin endpoint and metrics.

    Returns a fresh JSON-serialisable dict: the policy, and per tier whether it is
    configured and enabled (or why not), its self-test result, flows in it now and in
    total, and bytes moved in it; for the sockmap tier also the accelerator's counters
    (kernel-path bytes from the BPF counters, held bytes and holds of the backlog
    bound, aborts, arm failures, maximum backlog). Cheap; call it from the trio thread.
    """
    return _plugin.status()


@hookimpl
def l4gw_status() -> dict[str, Any]:
    return status()


@hookimpl
def l4gw_config_sections() -> Mapping[str, Mapping[str, Field]]:
    return {"relay": SCHEMA}


@hookimpl
def l4gw_configure(config: Config) -> None:
    _plugin.configure(config)


@hookimpl
def l4gw_startup(config: Config, nursery: trio.Nursery) -> Awaitable[None]:
    return _plugin.startup(nursery)


@hookimpl
def l4gw_relay(
    flow: Flow, client: socket.socket, upstream: socket.socket, idle_timeout: float
) -> Awaitable[str] | None:
    if not _plugin.plan:
        return None
    return _plugin.relay(flow, client, upstream, idle_timeout)


@hookimpl
def l4gw_shutdown(config: Config) -> None:
    _plugin.shutdown()
