"""The owning gateway's watch over its TPROXY state: notice a change, say so, restore it.

A gateway with ``[tproxy] manage = true`` owns its network namespace's TPROXY
state (:mod:`gateway.tproxy.owner`). If that state is removed or changed under
it (a hand-run ``nft flush ruleset``, another tool's cleanup, a mistaken
``ip rule del``), intercepted clients reach their original destinations
directly, unfiltered and unlogged, and the gateway sees no error of its own.
The guard checks every ``[tproxy] check_interval`` whether the installed state
still matches the plan this gateway installed, and if not logs an ERROR naming
each difference and restores it with :func:`gateway.tproxy.state.apply` (atomic,
idempotent).

Rules kept:

1. **Only the owner guards, and only what it installed.** The baseline is the
   plan of the config the owner applied: the one from start-up, or the one a
   reload applied since. A reload whose ``[tproxy]`` differs applies it (the
   owner is the only writer of its namespace's state, and listeners change on
   reload too, so the rules follow them); if that apply fails, the state set
   up before stays and stays guarded. A reloaded file without ``manage =
   true`` changes nothing: the installed state stays guarded until exit.
2. **Never on the event loop, never per connection.** Reading the state and
   applying it are blocking netlink and libnftables calls: each check runs in a
   thread of its own (see :func:`_in_new_thread` for why not trio's cache),
   reads only our own table, rules and routes (:func:`gateway.tproxy.state.read_own`),
   and is one task per process. A check in flight is waited for at shutdown,
   never abandoned: an abandoned restore could land after the teardown at exit.
3. **Loud, counted, visible.** A difference is an ERROR naming what differed;
   each restore counts (``l4gw.tproxy.restored``), ``l4gw.tproxy.intact`` is 1
   while the last check found (or made) the state intact. The admin
   ``/status`` and ``l4gw tproxy status`` show the same (the guard writes its
   report into the owner's record). Repeated identical failures are logged
   once a minute, not every check.
4. **An operator's --force wins.** The guard reads the forced marker after
   reading the state (tproxy_owner rule 5), so it never restores what an
   operator removed on purpose; it stands down for good, with a warning, and
   the gateway leaves the state alone at exit.
5. **Worker 0 guards.** With ``[gateway] workers = N`` the supervisor holds the
   lock and set the state up, but it is a small fork-and-wait loop with no
   event loop and no metrics; worker 0 serves the admin endpoint and
   ``/metrics``, has a loop to run the check from, reloads with the others,
   and is restarted by the supervisor if it dies (its successor starts from
   the config it serves, which a reload may have changed: a difference to the
   installed plan is applied at its start). One guard per namespace, never N.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import trio
import trio.lowlevel

from gateway.config import Config
from gateway.tproxy.owner import Forced, Ownership, held
from gateway.tproxy.plan import Plan, TproxyError, differences, plan, summary
from gateway.tproxy.state import apply, read_own

log = logging.getLogger("l4gw.tproxy")

REPEAT_INTERVAL: Final = 60.0
"""Seconds between two log lines that say the same thing (a restore that keeps failing)."""


@dataclass
class GuardStats:
    """What the guard found; read by ``/metrics``, ``/status`` and the owner's record.

    Written by the check (in its own thread), read from others: single attribute
    assignments, which need no lock.
    """

    checks: int = 0
    """Checks that could read the state."""
    restored: int = 0
    """Times the state differed and was restored."""
    intact: bool = True
    """The last check found the state as planned, or restored it."""
    last_check: float = 0.0
    """When the last check ran (seconds since the epoch; 0: none yet)."""
    last_restored: float = 0.0
    """When the last restore was (seconds since the epoch; 0: none yet)."""
    last_differences: tuple[str, ...] = ()
    """What the last check that found a difference found."""
    last_error: str = ""
    """Why the last check could not read or restore the state ("" when it could)."""
    stood_down: str = ""
    """Who took the state over with --force ("" while guarding)."""
    failures: int = 0
    """Checks that could not read or restore the state."""


class Guard:
    """The guard of one process (worker 0 of the owner); :meth:`run` is its task."""

    def __init__(self, ownership: Ownership, installed: Config) -> None:
        self.ownership = ownership
        self.installed = installed
        """The config whose plan is installed (rule 1)."""
        assert installed.tproxy is not None
        self.interval = installed.tproxy.check_interval
        self.stats = GuardStats()
        self._pending: Config | None = None
        self._wake = trio.Event()
        self._said: dict[str, float] = {}
        """What was logged lately, and when (rule 3)."""

    @classmethod
    def for_process(cls, serving: Config) -> Guard | None:
        """The guard for this process, if it owns (or inherited) a set-up TPROXY state.

        Args:
            serving: the config this process serves; a worker restarted after a
                reload serves a newer one than the supervisor installed (rule 5).
        """
        ownership = held()
        if ownership is None or ownership.installed is None:
            return None
        guard = cls(ownership, ownership.installed)
        guard.follow(serving)
        return guard

    # --- on the trio thread ---------------------------------------------------------------

    def follow(self, new: Config) -> None:
        """A (re)loaded config: apply its ``[tproxy]`` if it differs (rule 1).

        Called on reload (``Gateway.on_reload``); the apply itself runs in the
        guard's next check, in its thread.
        """
        if self.stats.stood_down:
            return
        tc = new.tproxy
        if tc is None or not tc.manage:
            log.warning(
                "tproxy: %s has no [tproxy] manage = true: the state set up from %s stays "
                "installed and guarded until exit (restart to change that)",
                new.path,
                self.installed.path,
            )
            return
        self.interval = tc.check_interval
        try:
            wanted = _identity(plan(new))
        except TproxyError as exc:
            log.error("tproxy: %s: %s; the installed state stays, and stays guarded", new.path, exc)
            return
        if wanted == _identity(plan(self.installed)):
            self.installed = new
            return
        self._pending = new
        self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Check every ``check_interval`` until cancelled or stood down."""
        global _current
        _current = self
        task_status.started()
        while not self.stats.stood_down:
            if self._pending is None:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, None
            try:
                await _in_new_thread(self.check, pending)
            except Exception:
                # A bug in the guard must not take the data plane down with it.
                log.exception("tproxy: the guard's check failed; it goes on")

    def status(self) -> dict[str, Any]:
        """The guard's report (``/status``, and the owner's record for ``l4gw tproxy status``)."""
        s = self.stats
        report = asdict(s)
        report["last_differences"] = list(s.last_differences)
        report["pid"] = os.getpid()
        report["check_interval"] = self.interval
        report["config"] = self.installed.path
        report["plan"] = summary(plan(self.installed))
        return report

    # --- in the check's own thread ------------------------------------------------------------

    def check(self, pending: Config | None = None) -> None:
        """One check: apply a reloaded ``[tproxy]``, then compare and restore. Blocking."""
        if pending is not None and self.ownership.forced() is None:
            self._apply_reloaded(pending)
        installed = self.installed
        p = plan(installed)
        try:
            state = read_own(p)
        except TproxyError as exc:
            self._failed(f"cannot check the TPROXY state: {exc}")
            return
        # After the read (rule 4): a forced change visible in ``state`` was announced first.
        forced = self.ownership.forced()
        if forced is not None:
            self._stand_down(forced)
            return
        s = self.stats
        s.checks += 1
        s.last_check = time.time()
        diffs = differences(p, state)
        if not diffs:
            s.intact, s.last_error = True, ""
            self._said.clear()
            self._publish()
            return
        s.intact, s.last_differences = False, tuple(diffs)
        self._say(
            f"the installed state no longer matches what this gateway set up "
            f"({installed.path}): {'; '.join(diffs)}; restoring it"
        )
        try:
            changes = apply(installed)
        except TproxyError as exc:
            self._failed(f"restoring the TPROXY state failed: {exc}")
            return
        s.restored += 1
        s.last_restored = time.time()
        s.intact, s.last_error = True, ""
        self._said.clear()
        log.warning("tproxy: restored (%s)", ", ".join(changes) or "table replaced")
        self._publish()

    def _apply_reloaded(self, new: Config) -> None:
        try:
            changes = apply(new)
        except TproxyError as exc:
            log.error(
                "tproxy: the changed [tproxy] of %s was not applied: %s; the state set up "
                "before stays, and stays guarded",
                new.path,
                exc,
            )
            return
        self.installed = new
        self.ownership.installed = new
        log.info(
            "tproxy: applied the changed [tproxy] of %s (%s)%s",
            new.path,
            summary(plan(new)),
            "".join(f"; {c}" for c in changes),
        )

    def _failed(self, text: str) -> None:
        s = self.stats
        s.failures += 1
        s.intact, s.last_error = False, text
        s.last_check = time.time()
        self._say(f"{text} (next try in {self.interval:g}s)")
        self._publish()

    def _say(self, text: str) -> None:
        """An ERROR, unless the same one was said less than REPEAT_INTERVAL ago (rule 3)."""
        now = time.monotonic()
        if now - self._said.get(text, -REPEAT_INTERVAL) >= REPEAT_INTERVAL:
            log.error("tproxy: %s", text)
            if len(self._said) > 16:
                self._said.clear()
            self._said[text] = now

    def _stand_down(self, forced: Forced) -> None:
        self.stats.stood_down = forced.describe()
        log.warning(
            "tproxy: %s took the TPROXY state over: this gateway no longer guards it and "
            "leaves it in place at exit",
            forced.describe(),
        )
        self._publish()

    def _publish(self) -> None:
        try:
            self.ownership.publish(self.status())
        except OSError as exc:
            # The record is for people; the guard goes on without it.
            log.debug("tproxy: cannot write the owner's record: %s", exc)


async def _in_new_thread(fn: Callable[[Config | None], None], arg: Config | None) -> None:
    """``fn(arg)`` in a thread started now, waited for even when cancelled (rule 2).

    Not trio's thread cache: Linux credentials are per thread, and ``[gateway] user``
    (gateway/process.py) trims the capabilities of the thread that drops privileges,
    while threads that existed before lose all of theirs at the setuid. A cached
    thread from before the drop would fail every check with EPERM; a thread started
    now inherits the loop thread's current capabilities (CAP_NET_ADMIN is kept for
    this). One thread per check every few seconds costs nothing measurable.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn(arg)
        except BaseException as exc:
            failure.append(exc)
        finally:
            token.run_sync_soon(done.set)

    threading.Thread(target=target, name="l4gw-tproxy-guard", daemon=True).start()
    with trio.CancelScope(shield=True):
        await done.wait()
    if failure:
        raise failure[0]


def _identity(p: Plan) -> tuple[Any, ...]:
    # NftRule compares by label only; the comment carries the digest of its expression.
    return (tuple(r.comment for r in p.rules), p.ip_rules, p.routes)


_current: Guard | None = None


def current() -> Guard | None:
    """The guard running in this process (None: this process guards nothing)."""
    return _current
