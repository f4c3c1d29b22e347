"""Who owns the TPROXY state of a network namespace: one live process at most.

The state :mod:`gateway.tproxy.state` installs (the table ``inet l4gw``, the ip rules
and routes tagged ``proto 244``) is one per network namespace, whatever config
made it. Before this module, a second ``l4gw run`` of the same file replaced a
running gateway's table, failed on the busy listener port, and on its way out
removed the running gateway's table, rule and route: intercepted clients then
reached their original destinations directly (an open relay) and the running
gateway never knew.

Rules kept:

1. **One owner per network namespace, by a kernel lock.** A managing ``l4gw
   run`` (and ``l4gw tproxy setup``/``teardown`` for the moment they work)
   takes ``flock(LOCK_EX | LOCK_NB)`` on ``/run/l4gw/tproxy-<inode>.lock``,
   where the inode is that of ``/proc/self/ns/net`` (unique among live
   namespaces). Taken before anything is changed; a start that finds it held
   changes nothing.
2. **The kernel releases it, whatever the death.** An flock belongs to the
   open file description: forked workers share it (so it is held until the
   supervisor and every worker are gone) and the kernel drops it when the last
   descriptor closes, kill -9 included. There is no pid file to judge stale:
   a record whose lock nobody holds is history, never an owner. The
   descriptor is close-on-exec, so no exec'd helper inherits it.
3. **The lock file holds the record.** JSON: the owner (pid, config, since,
   command) and, from the owner's guard (:mod:`gateway.tproxy.guard`), what
   its last check found. Written through the held descriptor (so it still
   works after ``[gateway] user`` dropped privileges), framed by ``seq`` and
   ``end`` so that a reader never takes a torn write for a record.
4. **Unlinked only while locked, and re-checked after locking.** The owner
   removes its lock file at exit while still holding the lock; whoever locks
   a file checks that the path still names the inode it locked, and starts
   over if not. So two processes can never hold locks on two different files
   for one namespace.
5. **Forcing is recorded before it acts.** ``l4gw tproxy setup|teardown
   --force`` beside a live owner first writes ``tproxy-<inode>.forced``
   naming that owner, then changes the state. The owner's guard reads the
   marker *after* it reads the state, so whatever change it sees, it also
   sees the marker that announced it: an operator's forced change is never
   undone. The owner then stands down (no more checks, no teardown at exit).

Why flock on a file and not an abstract unix socket or a lock on the nsfs
inode, which the kernel scopes to the namespace by itself: any local user in
the namespace can take those first (no permissions apply) and keep every
gateway from starting, and they have nowhere to keep the owner's record. The
price: every process that may own one namespace's state must see the same
``/run/l4gw`` (true on a host; containers sharing a host's network need a
shared directory there, see docs/operations.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from gateway.config import Config

log = logging.getLogger("l4gw.tproxy")

RUN_DIR: Final = Path("/run/l4gw")
"""Where the lock files live (the container image creates it for its user)."""
NETNS_PATH: Final = "/proc/self/ns/net"
LOCK_GRACE: Final = 0.25
"""Seconds a start retries a held lock: ``l4gw tproxy status`` takes it for a few
microseconds to see whether anyone holds it, which must not fail a start."""
_READ_MAX: Final = 256 * 1024


class OwnershipError(Exception):
    """The ownership lock could not be taken or read; ``str()`` says why and the fix."""


class Held(OwnershipError):
    """A live process owns the state; :attr:`owner` says who (None: not written yet)."""

    def __init__(self, owner: Owner | None, netns: int) -> None:
        self.owner = owner
        self.netns = netns
        where = f"the TPROXY state of this network namespace (net:[{netns}])"
        if owner is None:
            text = f"{where} is owned by a process that is still starting"
        elif owner.command == "l4gw run":
            text = f"{where} is owned by a running gateway: {owner.describe()}"
        else:
            text = f"{where} is being changed by {owner.command}: {owner.describe()}"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds the lock, as its record says."""

    pid: int
    """The process that took the lock (with workers, the supervisor)."""
    config: str
    """The config file it set the state up from ("-": none)."""
    since: float
    """When it took the lock (seconds since the epoch)."""
    command: str
    """``l4gw run``, ``l4gw tproxy setup``, ..."""

    def describe(self) -> str:
        """``pid 1234, config /etc/l4gw/gateway.toml, since 2025-01-02 03:04:05 UTC``, and
        a note when no process has that pid here (a supervisor killed with SIGKILL whose
        workers hold the lock until they have drained, or another pid namespace)."""
        text = f"pid {self.pid}, config {self.config}, since {format_time(self.since)}"
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            text += (
                " (no such process here: its workers may still be draining, or it runs in "
                "another pid namespace)"
            )
        except OSError:
            pass  # alive, another user's
        return text


@dataclass(frozen=True, slots=True)
class Forced:
    """``tproxy-<inode>.forced``: an operator's ``--force`` against a live owner."""

    owner_pid: int
    owner_since: float
    by: str
    """The command, e.g. ``l4gw tproxy teardown --force``."""
    by_pid: int
    at: float

    def describe(self) -> str:
        return f"{self.by} (pid {self.by_pid}) at {format_time(self.at)}"


@dataclass(frozen=True, slots=True)
class Probe:
    """What :func:`probe` found."""

    live: bool
    """A process holds the lock now."""
    owner: Owner | None
    """The record's owner: the live one, or (``live`` False) the last one, gone."""
    guard: dict[str, Any] | None
    """What the owner's guard published with its last check (None: nothing yet)."""
    netns: int


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def netns_inode() -> int:
    """The inode of this process's network namespace (``ip netns identify`` by number).

    Raises:
        OwnershipError: /proc is not mounted.
    """
    try:
        return os.stat(NETNS_PATH).st_ino
    except OSError as exc:
        raise OwnershipError(f"cannot tell the network namespace: {NETNS_PATH}: {exc}") from exc


def lock_path(netns: int, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"tproxy-{netns}.lock"


def forced_path(netns: int, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"tproxy-{netns}.forced"


class Ownership:
    """The lock, held; :func:`acquire` makes one. Inherited by forked workers."""

    def __init__(self, path: Path, fd: int, owner: Owner, netns: int, run_dir: Path) -> None:
        self.path = path
        self.fd = fd
        self.owner = owner
        self.netns = netns
        self.run_dir = run_dir
        self.installed: Config | None = None
        """The config whose plan the owner installed (set by ``tproxy.managed``);
        the guard of a worker forked later starts from it."""
        self._seq = 0

    def publish(self, guard: dict[str, Any] | None = None) -> None:
        """(Re)write the record: the owner, and what the guard last found.

        Raises:
            OSError: the write failed.
        """
        self._seq += 1
        document = {
            "seq": self._seq,
            "owner": asdict(self.owner),
            "netns": self.netns,
            "guard": guard,
            "end": self._seq,
        }
        data = (json.dumps(document) + "\n").encode()
        # Written in place through the held descriptor (rule 3): replacing the file
        # would give the path a new inode that a second start could lock (rule 4).
        # A reader that catches the old tail before the truncate fails to parse it
        # and reads again.
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def forced(self) -> Forced | None:
        """The operator's ``--force`` against this owner, if one was recorded."""
        marker = read_forced(self.netns, self.run_dir)
        if marker is None:
            return None
        if (marker.owner_pid, marker.owner_since) != (self.owner.pid, self.owner.since):
            return None  # left by an earlier owner's time
        return marker

    def release(self) -> None:
        """Give the lock up and remove its files; only in the process that took it
        (a forked worker's copy of the descriptor just closes when it exits)."""
        global _held
        if self.fd < 0 or os.getpid() != self.owner.pid:
            return
        # Rule 4: unlinked while still locked. After [gateway] user dropped
        # privileges the directory may not be writable any more; a file left behind
        # is history (rule 2), so that is fine.
        for path in (forced_path(self.netns, self.run_dir), self.path):
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(self.fd)
        self.fd = -1
        if _held is self:
            _held = None


_held: Ownership | None = None


def held() -> Ownership | None:
    """The ownership this process took, or inherited from the supervisor that forked it."""
    return _held


def acquire(config: str, command: str, run_dir: Path = RUN_DIR) -> Ownership:
    """Become the owner of this network namespace's TPROXY state.

    Args:
        config: the config file the state is set up from, for the record.
        command: what takes it (``l4gw run``, ``l4gw tproxy setup``, ...).
        run_dir: where the lock file lives.

    Raises:
        Held: a live process owns it (nothing was changed).
        OwnershipError: the lock file cannot be made (the message says how to fix it).
    """
    global _held
    netns = netns_inode()
    path = lock_path(netns, run_dir)
    try:
        run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise OwnershipError(_cannot(run_dir, exc)) from exc
    deadline = time.monotonic() + LOCK_GRACE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OwnershipError(_cannot(path, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner, _ = _read_record(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            raise Held(owner, netns) from None
        except OSError as exc:
            os.close(fd)
            raise OwnershipError(f"locking {path}: {exc.strerror}") from exc
        if _same_file(path, fd):
            break
        os.close(fd)  # the last owner removed it meanwhile (rule 4): lock the new one
    ownership = Ownership(
        path, fd, Owner(os.getpid(), config, time.time(), command), netns, run_dir
    )
    try:
        ownership.publish()
    except OSError as exc:
        ownership.release()
        raise OwnershipError(f"writing {path}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        forced_path(netns, run_dir).unlink()  # an earlier owner's, now meaningless
    _held = ownership
    return ownership


def probe(run_dir: Path = RUN_DIR) -> Probe:
    """Whether a live process owns this namespace's state, and what its record says.

    Raises:
        OwnershipError: the lock file exists but cannot be read.
    """
    netns = netns_inode()
    path = lock_path(netns, run_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Probe(False, None, None, netns)
    except OSError as exc:
        raise OwnershipError(f"reading {path}: {exc.strerror}") from exc
    try:
        try:
            # Shared and non-blocking, released at once by the close below; a start
            # that meets it retries for LOCK_GRACE.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            live = False
        except BlockingIOError:
            live = True
        owner, guard = _read_record(fd)
    finally:
        os.close(fd)
    return Probe(live, owner, guard, netns)


def mark_forced(owner: Owner, by: str, netns: int, run_dir: Path = RUN_DIR) -> None:
    """Record that ``by`` overrides the live ``owner`` (rule 5); call before acting.

    Raises:
        OwnershipError: the marker cannot be written (then do not act).
    """
    marker = Forced(owner.pid, owner.since, by, os.getpid(), time.time())
    path = forced_path(netns, run_dir)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(marker)) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OwnershipError(_cannot(path, exc)) from exc


def read_forced(netns: int, run_dir: Path = RUN_DIR) -> Forced | None:
    try:
        raw = json.loads(forced_path(netns, run_dir).read_text())
        return Forced(
            int(raw["owner_pid"]),
            float(raw["owner_since"]),
            str(raw["by"]),
            int(raw["by_pid"]),
            float(raw["at"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Unreadable or not ours: a marker that cannot be read does not stand a guard down.
        return None


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_record(fd: int) -> tuple[Owner | None, dict[str, Any] | None]:
    """The record's owner and guard report; (None, None) when empty or unreadable."""
    for _ in range(20):
        try:
            raw = os.pread(fd, _READ_MAX, 0)
        except OSError:
            return None, None
        if not raw.strip():
            return None, None
        try:
            document = json.loads(raw)
            if document.get("seq") != document.get("end"):
                raise ValueError("torn")
            o = document["owner"]
            owner = Owner(int(o["pid"]), str(o["config"]), float(o["since"]), str(o["command"]))
            guard = document.get("guard")
            return owner, guard if isinstance(guard, dict) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            time.sleep(0.005)  # caught mid-write (rule 3): read again
    return None, None


def _cannot(path: Path, exc: OSError) -> str:
    text = f"cannot write {path}: {exc.strerror or exc}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        text += (
            f" (the TPROXY ownership lock lives in {RUN_DIR}: create it writable by the "
            "gateway's user, e.g. systemd RuntimeDirectory=l4gw, or a tmpfs/emptyDir volume "
            "in a container)"
        )
    return text
