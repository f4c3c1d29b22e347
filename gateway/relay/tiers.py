"""The relay tiers of one gateway process: which are enabled, and moving flows through them.

:class:`RelayTiers` applies the policy (:mod:`gateway.relay.policy`) to the tiers
this host allows (:mod:`gateway.relay.probe`): a flow starts in ``copy``
(:mod:`gateway.relay.copy`) and is handed to ``splice`` (:mod:`gateway.relay.splice`)
or ``sockmap`` (:mod:`gateway.relay.sockmap`) once promoted. The ``relay`` plugin
connects it to the hooks (``l4gw_relay`` and the lifecycle hooks); nothing here
reads a hook or a plugin.

Rules kept here:

1. **Zero cost when off.** With no kernel tier enabled :attr:`RelayTiers.plan` is
   empty, and the plugin leaves every flow to the core exactly as without it.
2. **Self-test before use, once, off the connection path.** :meth:`RelayTiers.startup`
   loads each listed kernel tier and runs its canary flow over loopback in a worker
   thread; a tier is enabled only if its canary passed. Otherwise one line says why
   and which tier the flows use instead (a warning when the operator listed the tier,
   at info level for the default list).
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
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from gateway.config import Config
from gateway.flow import CloseReason, Flow, Handover
from gateway.relay import poller
from gateway.relay.copy import CopyRelay, Promotion
from gateway.relay.policy import (
    BULK_WINDOW,
    DEFAULT_TIERS,
    KERNEL_TIERS,
    SCHEMA,
    TIERS,
    Policy,
    fallback,
    plan,
    setting,
    tiers_for,
)
from gateway.relay.probe import probe, remove_stale
from gateway.relay.sockmap import Accelerator, ArmError, FlowReport
from gateway.relay.splice import OUT_OF_FDS, splice_relay
from gateway.relay.stats import TierCounters

__all__ = ["RelayTiers", "TierCounters", "TierState"]

log = logging.getLogger("l4gw.relay")

_PUBLISH_EVERY: Final = 1.0
# Accelerator.relay's own abort reasons; the core knows them as internal errors.
_SOCKMAP_ABORTS: Final = frozenset({"backlog_cap", "drain_timeout", "anomaly"})


@dataclass
class TierState:
    """Whether a tier may be used, and why not."""

    configured: bool = False
    enabled: bool = False
    why_not: str | None = "not loaded yet"
    self_test: str = "not run"
    self_test_seconds: float | None = None
    counters: TierCounters = field(default_factory=TierCounters)


class RelayTiers:
    """The policy, the loaded tiers and their counters of one process."""

    def __init__(self) -> None:
        self.section: Mapping[str, Any] = {}
        self.policy = Policy(DEFAULT_TIERS, SCHEMA["promote_after_bytes"].default, 1.0)
        self.tiers = {name: TierState() for name in TIERS}
        self.tiers["copy"] = TierState(configured=True, enabled=True, why_not=None)
        self.tiers["copy"].self_test = "not needed"
        self.accelerator: Accelerator | None = None
        self.plan: tuple[str, ...] = ()
        """The enabled kernel tiers in preference order; () leaves every flow to the core."""
        self.handover: Handover | None = None
        """What the plugin answers for every flow while :attr:`plan` is not empty and
        promotion is not at once: the core copies the flow, then :meth:`promoted`."""
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
        """Take a (re)loaded configuration: its ``[plugin.relay]`` and buffer size.

        Tiers that a reload adds are probed only at the next start (a warning says so).
        """
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
        p = self.policy
        self.handover = (
            Handover(p.after_bytes, p.after_seconds, self.promoted, self.tiers["copy"].counters)
            if self.plan and not p.immediate
            else None
        )

    async def startup(self, nursery: trio.Nursery) -> None:
        """Clean up after dead gateways, probe the listed kernel tiers (in worker
        threads), enable those that passed, and start publishing the status file."""
        status_dir = str(setting(self.section, "status_dir"))
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
        """Leave flows to the core, close the accelerator, remove the status file."""
        self.plan, self.handover = (), None
        if self.accelerator is not None:
            self.accelerator.close()
            self.accelerator = None
            self.tiers["sockmap"].enabled = False
            self.tiers["sockmap"].why_not = "stopped"
        self._unpublish()

    # status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The relay tiers of this process, for the admin endpoint and the status file.

        Returns a fresh JSON-serialisable dict: the policy, and per tier whether it is
        configured and enabled (or why not), its self-test result, flows in it now and
        in total, and bytes moved in it; for the sockmap tier also the accelerator's
        counters (kernel-path bytes from the BPF counters, held bytes and holds of the
        backlog bound, aborts, arm failures, maximum backlog), for the splice tier its
        pipes (``lent`` to directions with bytes in flight, ``free`` in the pool,
        ``refused``: takes that found none and could make none). Cheap; call it from
        the trio thread.
        """
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
            if name == "copy":
                entry["loop"] = "compiled" if self.copy.compiled else "python"
            elif name == "sockmap" and self.accelerator is not None:
                entry["accelerator"] = self.accelerator.status()
            elif name == "splice" and (run := poller.running()) is not None:
                pipes = run.pipes
                entry["pipes"] = {
                    "lent": pipes.lent,
                    "free": len(pipes.free),
                    "refused": pipes.refused,
                }
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
        """Relay one flow to its end through the tiers of :attr:`plan`; the close reason.

        Call only while :attr:`plan` is not empty (the plugin offers the flow to the
        core otherwise). The plugin answers :attr:`handover` instead where there is
        one, and the core does this method's copy phase itself.
        """
        policy = self.policy
        if policy.immediate:
            return await self._kernel(flow, client, upstream, idle_timeout, self.plan)
        flow.tier = "copy"
        promotion = Promotion(policy.after_bytes, flow.started_monotonic + policy.after_seconds)
        closed = await self.copy.run(
            client, upstream, flow, idle_timeout, promotion, self.tiers["copy"].counters
        )
        if closed is not None:
            return closed
        return await self.promoted(flow, client, upstream, idle_timeout)

    def promoted(
        self, flow: Flow, client: socket.socket, upstream: socket.socket, idle_timeout: float
    ) -> Coroutine[Any, Any, str]:
        """Take a flow whose promotion out of ``copy`` is due (:attr:`handover`'s
        ``then``) through the kernel tiers: the coroutine to await for the close reason.

        Not a coroutine itself: the core awaits the one it returns, so no frame of this
        stays with a flow through its life in a kernel tier (about 300 bytes each)."""
        self.promotions += 1
        tiers = self.plan
        # Whether it is bulk decides the tier: then _kernel watches how fast it moves
        # first.
        bulk_decides = tiers_for(tiers, True, self.policy.sockmap_for_bulk) != tiers
        return self._kernel(flow, client, upstream, idle_timeout, tiers, bulk_decides)

    async def _kernel(
        self,
        flow: Flow,
        client: socket.socket,
        upstream: socket.socket,
        idle_timeout: float,
        tiers: tuple[str, ...],
        bulk_decides: bool = False,
    ) -> str:
        """The first of ``tiers`` that takes the flow relays it to its end; ``copy``
        when none does. With ``bulk_decides``, the flow's rate picks the tiers first."""
        if bulk_decides:
            # Watch how fast it moves now (its average would count the think time of a
            # request/response flow, or the quiet start of a download).
            closed, bulk = await self._measure(client, upstream, flow, idle_timeout)
            if closed is not None:
                return closed
            tiers = tiers_for(tiers, bulk, self.policy.sockmap_for_bulk)
        idle = idle_timeout or None
        for tier in tiers:
            if tier == "sockmap":
                acc = self.accelerator
                if acc is None:
                    continue
                if not acc.room():  # at the cap (sockmap_max_flows): the next tier
                    self.fallbacks += 1
                    flow.add_event("relay_fallback", tier="sockmap", reason=acc.full_reason)
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
                try:
                    return await splice_relay(client, upstream, flow, idle_timeout=idle)
                except OSError as exc:
                    # Out of descriptors for a pipe (many flows near the fd limit):
                    # raised only while no byte is in a pipe (gateway/relay/splice.py
                    # rule 2), so the copy tier, which needs no descriptor of its own,
                    # carries the flow on.
                    if exc.errno not in OUT_OF_FDS:
                        raise
                    self.fallbacks += 1
                    flow.add_event("relay_fallback", tier="splice", reason=str(exc))
        flow.tier = "copy"
        closed = await self.copy.run(
            client, upstream, flow, idle_timeout, None, self.tiers["copy"].counters
        )
        assert closed is not None
        return closed

    async def _measure(
        self, client: socket.socket, upstream: socket.socket, flow: Flow, idle_timeout: float
    ) -> tuple[str | None, bool]:
        """Copy on until the flow moved ``BULK_WINDOW`` more bytes or the time that
        takes at ``bulk_rate`` passed; returns (close reason or None, bulk)."""
        policy = self.policy
        began, before = time.monotonic(), flow.bytes_from_client + flow.bytes_to_client
        window = Promotion(before + BULK_WINDOW, began + BULK_WINDOW / policy.bulk_rate)
        # Still the flow's stay in ``copy``, which it entered once: not a flow more.
        counters = self.tiers["copy"].counters
        counters.flows_now += 1
        try:
            closed = await self.copy.run(client, upstream, flow, idle_timeout, window)
        finally:
            counters.flows_now -= 1
            moved = flow.bytes_from_client + flow.bytes_to_client - before
            counters.bytes += moved
        return closed, policy.is_bulk(moved, time.monotonic() - began)

    def _in(self, flow: Flow, tier: str, entered: bool = True) -> _InTier:
        """Count ``flow`` in ``tier`` while the block runs; with ``entered=False`` the
        flow enters only when the callable the block gets is called (sockmap: once armed)."""
        return _InTier(self.tiers[tier].counters, flow, tier, entered)


class _InTier:
    """:meth:`Tiers._in`: a class rather than a generator, since a flow in the copy
    tier holds it while idle (a suspended generator and its closure were ~600 bytes
    of each idle connection, bench/conn_cost.py idle)."""

    __slots__ = ("before", "counters", "entered", "flow", "inside", "tier")

    def __init__(self, counters: TierCounters, flow: Flow, tier: str, entered: bool) -> None:
        self.counters = counters
        self.flow = flow
        self.tier = tier
        self.entered = entered
        self.before = flow.bytes_from_client + flow.bytes_to_client
        self.inside = False

    def enter(self) -> None:
        self.inside = True
        c, flow = self.counters, self.flow
        c.flows_now += 1
        c.flows_total += 1
        flow.tier = self.tier
        flow.add_event("spliced", tier=self.tier, bytes_before=self.before)

    def __enter__(self) -> Callable[[], None]:
        if self.entered:
            self.enter()
        return self.enter

    def __exit__(self, *exc: object) -> None:
        if self.inside:
            c, flow = self.counters, self.flow
            c.flows_now -= 1
            c.bytes += flow.bytes_from_client + flow.bytes_to_client - self.before
