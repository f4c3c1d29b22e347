"""``[gateway] watch_config``: reload when the config file is replaced or rewritten.

Kubernetes updates a mounted ConfigMap by writing a new directory and swapping
a symlink (``..data``) to it; editors and ``install``/``mv`` replace a file by
renaming a new one over it. Neither is seen by a watch on the old inode, and
inotify on a path behind symlinks misses the swap. So the watch polls: every
:data:`POLL` seconds it stats the path, following every symlink, and compares
``(st_dev, st_ino, st_mtime_ns, st_size)`` of the file it resolves to.

Rules kept here:

* **The same path as SIGHUP.** A change is acted on by sending the process
  SIGHUP (:func:`request_reload`): the supervisor forwards it to every worker,
  a single process's signal loop reloads; validation, the running config kept
  on any problem, the reload's log lines, ``/status`` and sd_notify are those
  of a SIGHUP.
* **A file is read once it holds still.** A change is acted on when two polls
  in a row see the same new stamp, so a file written in place (not renamed) is
  not reloaded half-written. An atomic replace is picked up within two polls.
* **A missing file is no change.** The running config stays; when the file
  comes back with a stamp unlike the last one loaded, it is reloaded.
* **Off costs nothing.** With ``watch_config = false`` nothing is stat'ed;
  turning it on by a reload starts from the file as it is then.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import trio

from gateway.config import Config

log = logging.getLogger("l4gw.configwatch")

POLL = 1.0
"""Seconds between two looks at the file."""

Stamp = tuple[int, int, int, int]


def stamp(path: str) -> Stamp | None:
    """``(st_dev, st_ino, st_mtime_ns, st_size)`` of the file ``path`` resolves to, or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class ConfigWatch:
    """Decides, poll by poll, whether the config file changed (on plain values).

    Args:
        stat: ``path -> Stamp | None`` (:func:`stamp`; tests pass their own).
    """

    def __init__(self, stat: Callable[[str], Stamp | None] = stamp) -> None:
        self._stat = stat
        self._path: str | None = None
        self._loaded: Stamp | None = None
        """The stamp of the file as last loaded (or first seen)."""
        self._seen: Stamp | None = None
        """The stamp the previous poll saw, when it differed from ``_loaded``."""

    def poll(self, config: Config) -> bool:
        """One look at ``config``'s file; True when it is to be reloaded now."""
        if not config.gateway.watch_config:
            self._path = None  # turned on later: start from the file as it is then
            return False
        now = self._stat(config.path)
        if self._path != config.path:
            self._path, self._loaded, self._seen = config.path, now, None
            return False
        if now is None or now == self._loaded:
            self._seen = None
            return False
        if now != self._seen:
            self._seen = now  # changed since the last poll: wait until it holds still
            return False
        self._loaded, self._seen = now, None
        return True


def request_reload() -> None:
    """The SIGHUP path, exactly: the process sends itself SIGHUP."""
    os.kill(os.getpid(), signal.SIGHUP)


async def run(config: Callable[[], Config], watch: ConfigWatch | None = None) -> None:
    """Poll the running config's file forever (a background task of a single-process
    gateway; with workers, the supervisor polls in its wait loop)."""
    watch = watch if watch is not None else ConfigWatch()
    while True:
        # The first look is at once: the file as loaded at start is the baseline.
        current = config()
        if watch.poll(current):
            log.info("%s changed: reloading", current.path)
            request_reload()
        await trio.sleep(POLL)
