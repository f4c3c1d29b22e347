"""``[gateway] workers = N``: N gateway processes sharing the TCP listeners.

One trio loop is one core. With ``workers > 1`` the ``l4gw run`` process
becomes a small supervisor: it forks the workers (each opens the TCP
listeners with SO_REUSEPORT, so the kernel spreads new connections over
them), forwards SIGTERM/SIGINT/SIGHUP/SIGUSR1 to every worker, restarts a
worker that dies on its own (with a back-off), and exits once all workers
have exited after a stop. Worker 0 alone serves UDP listeners and the admin
endpoint (a UDP session table is per process); it answers for every worker
(``/metrics``, ``/connections``, ``/readyz``) by asking the others over the
channels the supervisor sets up before the first fork (:mod:`gateway.peers`),
which also keep each worker's last metrics report across its restarts.
Workers die with the supervisor (PR_SET_PDEATHSIG), so a kill -9 of the
supervisor leaves no orphan serving stale config.

State that must be shared across workers (global rate limits) belongs in a
real store (the Redis backend), as across hosts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable

from gateway import peers
from gateway.linux import PR_SET_PDEATHSIG
from gateway.sdnotify import WorkerReports

log = logging.getLogger("l4gw.workers")

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_RESTART_BACKOFF = (0.1, 5.0)

HELD_WHILE_STARTING = frozenset({signal.SIGHUP, signal.SIGUSR1})
"""Signals a new worker holds until its signal loop runs (server.Gateway unblocks them)."""
_HEALTHY_RUN = 30.0
"""A worker that ran this long before it died restarts without the back-off it had."""

EXIT_START_FAILED = 3
"""A worker's exit code when it failed before it was ready (gateway/cli/main.py: run_one)."""


def supervise(
    count: int,
    run_worker: Callable[[int], int],
    on_reload: Callable[[], None] | None = None,
    reports: WorkerReports | None = None,
) -> int:
    """Fork ``count`` workers running ``run_worker(index)``; return when all are done.

    A worker that exits on its own is restarted, except when the first start of
    the workers fails (a port in use will not free itself: every worker is stopped
    and the supervisor exits 1) or a worker found its config invalid.

    Args:
        count: how many workers.
        run_worker: what a worker process runs; its return value is its exit code.
        on_reload: called in the supervisor on SIGHUP (before forwarding it), so
            that a worker restarted later runs the config the others run.
        reports: the workers' readiness, turned into sd_notify messages for systemd
            (gateway/sdnotify.py); its ``wait`` replaces ``os.wait``.

    Returns:
        0 after a requested stop, 1 when the workers could not be kept running.
    """
    children: dict[int, int] = {}
    started: dict[int, float] = {}
    restarted: set[int] = set()
    stopping = False
    backoff = _RESTART_BACKOFF[0]
    fleet = peers.Fleet(count)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for signum in _FORWARDED:
                    signal.signal(signum, signal.SIG_DFL)
                # A reload or reopen forwarded while this worker starts would kill it
                # (their default action): held until its signal loop takes them.
                signal.pthread_sigmask(signal.SIG_BLOCK, HELD_WHILE_STARTING)
                _die_with_parent()
                peers.install(fleet.link(index))
                if reports is not None:
                    reports.in_worker(index)
                code = run_worker(index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        started[pid] = time.monotonic()
        if reports is not None:
            reports.started(index)

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            if reports is not None:
                reports.stopping()
        elif signum == signal.SIGHUP:
            if reports is not None:
                reports.reloading()
            if on_reload is not None:
                on_reload()
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for index in range(count):
        spawn(index)
    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    log.info("supervising %d workers: %s", count, ", ".join(map(str, children)))
    failed = False
    try:
        while children:
            try:
                pid, status = os.wait() if reports is None else reports.wait()
            except ChildProcessError:
                break
            if pid not in children:
                continue
            index = children.pop(pid)
            if reports is not None:
                reports.exited(index)
            if time.monotonic() - started.pop(pid) >= _HEALTHY_RUN:
                backoff = _RESTART_BACKOFF[0]  # a crash now and then is not a crash loop
            if stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            first_start_failed = code == EXIT_START_FAILED and index not in restarted
            if code == 2 or first_start_failed:  # will not go away by itself
                log.error("worker %d (pid %d) exited with %d; stopping", index, pid, code)
                failed = True
                forward(signal.SIGTERM, None)
                continue
            log.error(
                "worker %d (pid %d) exited with %d; restarting in %gs", index, pid, code, backoff
            )
            restarted.add(index)
            time.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF[1])
            if not stopping:
                spawn(index)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else 0


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor is already gone
        os._exit(0)
