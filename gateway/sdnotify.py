"""systemd's readiness protocol, sd_notify(3), without libsystemd: one datagram per message.

``Type=notify`` units learn the service's state from datagrams sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace); the payload is newline-separated ``KEY=VALUE`` fields.
The gateway sends:

* ``READY=1`` with a ``STATUS=`` line once every listener is open (with
  ``[gateway] workers``, once every worker's are: the supervisor sends it);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload (SIGHUP,
  ``watch_config``) begins and ``READY=1`` when it is over, whatever its outcome
  (systemd 253+ requires the pair for ``Type=notify-reload``; 252 ignores it);
* ``STOPPING=1`` when the drain begins;
* ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` when systemd asks for it
  (``WatchdogSec=``) and ``$WATCHDOG_PID`` is unset or this process.

Rules kept here:

* **Only the process systemd started talks to systemd.** :func:`take` reads
  and removes the variables from the environment at start, so nothing the
  gateway starts later (workers, the span exporter process, a plugin's
  subprocess) inherits them and speaks for the service.
* **Workers report to the supervisor, which speaks for the service.** Each
  worker's notifier sends the same messages, tagged ``L4GW_WORKER=<index>``,
  over a socket pair made before the fork (:class:`WorkerReports`); the
  supervisor says READY once every worker has said so, and RELOADING, READY
  and STOPPING once for all of them.
* **Notification never fails the gateway.** No socket, a socket that is gone
  or full: the message is dropped (debug log), as libsystemd does.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("l4gw.sdnotify")

WORKER_FIELD = "L4GW_WORKER"
"""The field a worker's message carries its index in (systemd ignores unknown fields)."""
SUPERVISOR_FIELD = "L4GW_SUPERVISOR"
"""The field of the supervisor's own marker in the workers' report queue."""


class Notifier:
    """Sends sd_notify messages to one socket; does nothing without one.

    Args:
        address: ``$NOTIFY_SOCKET`` (``/path`` or ``@abstract``), or None.
        sock: a connected datagram socket instead (a worker's end of the pair).
        tag: a field added to every message (a worker's index).
        watchdog: seconds between ``WATCHDOG=1`` messages, or None.
    """

    def __init__(
        self,
        address: str | None = None,
        sock: socket.socket | None = None,
        tag: str = "",
        watchdog: float | None = None,
    ) -> None:
        self.address: str | bytes | None = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock = sock
        self._tag = tag
        self.watchdog = watchdog
        """Seconds between two ``WATCHDOG=1`` messages (half of ``$WATCHDOG_USEC``)."""

    @property
    def enabled(self) -> bool:
        return self._sock is not None or self.address is not None

    def send(self, *fields: str) -> bool:
        """One datagram of ``fields`` (``"READY=1"``, ``"STATUS=..."``); False when
        there is nowhere to send it or the send failed."""
        if not self.enabled:
            return False
        text = "\n".join((*fields, self._tag) if self._tag else fields) + "\n"
        try:
            if self._sock is None:
                assert self.address is not None
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
                self._sock.connect(self.address)
            self._sock.send(text.encode())
            return True
        except OSError as exc:
            log.debug("sd_notify %r: %s", fields, exc)
            if self.address is not None and self._sock is not None:
                self._sock.close()
                self._sock = None  # connect again next time (systemd restarted)
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={one_line(status)}")

    def reloading(self, status: str = "reloading") -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={one_line(status)}")

    def stopping(self, status: str = "draining") -> bool:
        return self.send("STOPPING=1", f"STATUS={one_line(status)}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={one_line(status)}")

    def ping(self) -> bool:
        """``WATCHDOG=1``: the process is alive."""
        return self.send("WATCHDOG=1")


def one_line(text: str) -> str:
    """A ``STATUS=`` value: the first line, at most 200 characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 200 else line[:197] + "..."


def watchdog_interval(env: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages, or None when systemd asks for none
    (sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` set and ``$WATCHDOG_PID`` unset or ``pid``)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "") or 0)
        owner = int(env.get("WATCHDOG_PID", "") or pid)
    except ValueError:
        return None
    if usec <= 0 or owner != pid:
        return None
    return usec / 2e6


_current = Notifier()


def take(env: MutableMapping[str, str] | None = None) -> Notifier:
    """The notifier of ``$NOTIFY_SOCKET`` (and the watchdog), made this process's
    (:func:`current`); the variables are removed from ``env`` (``os.environ``)."""
    global _current
    env = os.environ if env is None else env
    interval = watchdog_interval(env, os.getpid())
    address = env.pop("NOTIFY_SOCKET", None)
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    _current = Notifier(address, watchdog=interval)
    return _current


def current() -> Notifier:
    """This process's notifier: systemd's, a worker's report to its supervisor, or
    one that sends nothing."""
    return _current


def use(notifier: Notifier) -> None:
    """Make ``notifier`` this process's (a worker's, right after the fork)."""
    global _current
    _current = notifier


# --- the supervisor's side (gateway/workers.py) ----------------------------------------------


class WorkerReports:
    """What the workers report, turned into the service's state for systemd.

    Made by the supervisor before it forks; each worker calls :meth:`in_worker`
    right after the fork, and the supervisor waits for its children through
    :meth:`wait`, which also reads the reports, pings the watchdog and runs
    ``tick`` (the config watch) about every :data:`POLL` seconds.

    Args:
        count: the number of workers.
        systemd: the supervisor's own notifier (:func:`take`).
        tick: called once per poll in the supervisor (may send itself SIGHUP).
    """

    POLL = 0.2

    def __init__(self, count: int, systemd: Notifier, tick: Callable[[], None] | None = None):
        self.count = count
        self.systemd = systemd
        self._tick = tick
        self._theirs, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ours.setblocking(False)
        self.ready: set[int] = set()
        """Workers ready since the start or the last reload."""
        self.live: set[int] = set()
        self._announced = False
        self._reloading = False
        self._stopping = False
        self._next_ping = time.monotonic()
        self._failed_reloads: dict[int, str] = {}

    # in the worker
    def in_worker(self, index: int) -> None:
        """Right after the fork: this worker reports to the supervisor, never to systemd."""
        self._ours.close()
        self._theirs.setblocking(False)  # a report never stalls the worker's loop
        use(Notifier(sock=self._theirs, tag=f"{WORKER_FIELD}={index}"))

    # in the supervisor
    def started(self, index: int) -> None:
        self.live.add(index)

    def exited(self, index: int) -> None:
        self.live.discard(index)
        self.ready.discard(index)
        if not self._stopping:
            self.systemd.status(f"worker {index} exited; {len(self.ready)}/{self.count} ready")

    def reloading(self) -> None:
        """SIGHUP (called from the signal handler, before it is forwarded): the workers
        reload; READY once each has said so again.

        The handler may run between any two lines of :meth:`wait`, so it changes no
        state: it queues a marker behind the reports already sent, ahead of every
        report of the reload (the workers get the signal after this), and the loop
        applies it in that order.
        """
        try:
            # Never block in a signal handler (the only reader is this same thread).
            self._theirs.send(f"{SUPERVISOR_FIELD}=reloading\n".encode(), socket.MSG_DONTWAIT)
        except OSError as exc:  # pragma: no cover - a full queue of tiny datagrams
            log.warning("sd_notify: reload not tracked: %s", exc)

    def stopping(self) -> None:
        """SIGTERM: STOPPING at once (the loop may end before it reads again)."""
        if not self._stopping:
            self._stopping = True
            self.systemd.stopping(f"draining {self.count} workers")

    def wait(self) -> tuple[int, int]:
        """``os.wait()`` that also serves the reports (see the class docstring).

        Raises:
            ChildProcessError: no child left.
        """
        while True:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                return pid, status
            try:
                readable, _, _ = select.select([self._ours], [], [], self.POLL)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                readable = []
            if readable:
                self._read()
            self._watchdog()
            if self._tick is not None:
                self._tick()

    def _watchdog(self) -> None:
        interval = self.systemd.watchdog
        if interval is not None and time.monotonic() >= self._next_ping:
            self.systemd.ping()
            self._next_ping = time.monotonic() + interval

    def _read(self) -> None:
        while True:
            try:
                data = self._ours.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            fields = dict(
                line.split("=", 1)
                for line in data.decode(errors="replace").splitlines()
                if "=" in line
            )
            if fields.get(SUPERVISOR_FIELD) == "reloading":
                self._begin_reload()
                continue
            try:
                index = int(fields.get(WORKER_FIELD, ""))
            except ValueError:
                continue
            if fields.get("READY") == "1" and index in self.live:
                self.ready.add(index)
                status = fields.get("STATUS", "")
                if status.startswith("reload failed"):
                    self._failed_reloads[index] = status
                self._update()

    def _begin_reload(self) -> None:
        if self._stopping:
            return
        self.ready.clear()
        self._failed_reloads.clear()
        self._reloading = True
        self.systemd.reloading(f"reloading {self.count} workers")

    def _update(self) -> None:
        if self._stopping or len(self.ready) < self.count:
            return
        if not self._announced or self._reloading:
            failed = sorted(self._failed_reloads.items())
            status = (
                f"{self.count} workers ready"
                if not failed
                else f"{self.count} workers ready; worker {failed[0][0]}: {failed[0][1]}"
            )
            if not self._announced:
                # The workers' own "ready:" lines come one by one; this one says the
                # whole fleet (and worker 0's admin endpoint) serves.
                log.info("all %d workers ready", self.count)
            self._announced = True
            self._reloading = False
            self.systemd.ready(status)
        else:
            self.systemd.status(f"{self.count} workers ready")


async def watchdog(notifier: Notifier) -> None:
    """Send ``WATCHDOG=1`` every ``notifier.watchdog`` seconds, forever (a single
    process's background task: a loop that stalls stops the pings)."""
    import trio

    interval = notifier.watchdog
    if interval is None:
        return
    while True:
        notifier.ping()
        await trio.sleep(interval)
