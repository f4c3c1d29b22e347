"""What the gateway process sets about itself: its open-file limit, its user and
its capabilities.

Rules kept here:

1. **The open-file limit fits the caps.** systemd and most shells give a soft
   RLIMIT_NOFILE of 1024 while the hard limit is far higher; with the default
   ``max_connections = 10000`` a gateway at the soft limit served 503 of 1,000
   concurrent clients. At start the soft limit is raised to the hard one (no
   privilege needed), and when even the hard limit cannot hold what the caps
   allow, one warning says so with the numbers.
2. **Drop privileges once, after everything privileged is set up.** With
   ``[gateway] user``, each serving process becomes that user (and group) once
   its listeners are bound, its TPROXY state is installed and its BPF objects
   are loaded, keeping only the capabilities that serving this configuration
   still needs (:func:`needed_capabilities`); the bounding set loses every other
   one, so nothing can regain them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import sys

import trio

from gateway.config import Config
from gateway.identity import Identity
from gateway.linux import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE

log = logging.getLogger("l4gw.process")

FDS_PER_CONNECTION = 2
"""The client socket and the upstream socket (a spliced flow adds two pipes)."""
FDS_BASE = 64
"""The process's own: listeners, admin endpoint, epoll, plugin files, telemetry pipe, BPF maps."""


def fds_needed(config: Config) -> int:
    """File descriptors one serving process may hold at its caps."""
    need = FDS_BASE + len(config.listeners)
    for lc in config.listeners:
        if lc.protocol == "tcp":
            need += FDS_PER_CONNECTION * lc.max_connections
        else:
            need += lc.max_sessions  # one upstream socket per session
    return need


def raise_open_file_limit(config: Config) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when the caps need more.

    Returns:
        (soft, hard) in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # hard = unlimited above fs.nr_open
            log.warning("open files: cannot raise the soft limit %d to %d: %s", soft, hard, exc)
    need = fds_needed(config)
    if soft < need:
        log.warning(
            "open files: the limit is %d but the configured caps need about %d "
            "(%d per connection x max_connections, per UDP session, + %d); connections past "
            "the limit wait in the kernel backlog. Raise the hard limit (systemd "
            "LimitNOFILE=, ulimit -Hn, podman --ulimit nofile=) or lower max_connections",
            soft,
            need,
            FDS_PER_CONNECTION,
            FDS_BASE + len(config.listeners),
        )
    return soft, hard


# --- the user and its capabilities -----------------------------------------------------------

# linux/capability.h: _LINUX_CAPABILITY_VERSION_3 (two 32-bit words per set)
_CAP_VERSION_3 = 0x20080522
# linux/prctl.h
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_KEEPCAPS = 8
# linux/capability.h: CAP_LAST_CAP is 40 (CAP_CHECKPOINT_RESTORE) on 5.9+; probe past it.
_CAP_PROBE_LIMIT = 64

CAPABILITY_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE"}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def needed_capabilities(config: Config) -> frozenset[int]:
    """The capabilities serving ``config`` still needs once set up.

    * ``CAP_NET_ADMIN``: ``IP_TRANSPARENT`` on upstream sockets
      (``upstream_source = "client"``) and on listeners a reload opens, the
      TPROXY guard that restores removed rules, and forced socket buffer sizes.
    * ``CAP_NET_BIND_SERVICE``: a reload that opens a listener, or moves the
      admin endpoint, below port 1024.

    Loading BPF (``CAP_BPF``, ``CAP_PERFMON``) happens before the drop; the
    sockmap tier afterwards only updates maps through the descriptors it holds,
    which needs no capability.
    """
    caps: set[int] = set()
    transparent = any(lc.transparent for lc in config.listeners)
    client_source = any(c.upstream_source == "client" for c in config.clusters.values())
    managed = config.tproxy is not None and config.tproxy.manage
    if transparent or client_source or managed:
        caps.add(CAP_NET_ADMIN)
    ports = [lc.port for lc in config.listeners]
    if config.admin is not None:
        ports.append(config.admin.port)
    if any(0 < p < 1024 for p in ports):
        caps.add(CAP_NET_BIND_SERVICE)
    return frozenset(caps)


def unreadable_installation(identity: Identity, paths: list[str] | None = None) -> str | None:
    """A directory of the running installation that ``identity`` could not read, or None.

    After the drop the process still imports modules lazily and restarts its span
    exporter (``sys.executable``): an interpreter under a home directory only root
    may enter (``/root/.pyenv``) would fail then, far from the cause.
    """
    if paths is None:
        paths = [
            os.path.dirname(os.path.realpath(sys.executable)),
            os.path.dirname(os.path.abspath(os.__file__)),  # the standard library
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # gateway's parent
            os.path.dirname(os.path.dirname(os.path.abspath(trio.__file__))),  # site-packages
        ]
    wanted = set(paths)
    for path in sorted(wanted):  # each directory from the root down
        parts = path.split(os.sep)
        for i in range(1, len(parts) + 1):
            directory = os.sep.join(parts[:i]) or os.sep
            # Passing through a directory takes x; the directory imports read takes r too.
            need = 0o5 if i == len(parts) else 0o1
            try:
                st = os.stat(directory)
            except OSError:
                continue
            if st.st_uid == identity.uid:
                bits = st.st_mode >> 6
            elif st.st_gid == identity.gid:
                bits = st.st_mode >> 3
            else:
                bits = st.st_mode
            if bits & need != need:
                return directory
    return None


def drop_privileges(identity: Identity, keep: frozenset[int]) -> None:
    """Become ``identity`` keeping exactly the capabilities ``keep``.

    Order matters: the bounding set is trimmed while CAP_SETPCAP is still held;
    PR_SET_KEEPCAPS lets the permitted set survive setuid; then capset(2) makes
    ``keep`` the permitted and effective sets (inheritable empty).

    Raises:
        OSError: the kernel refused a step (the message names it).
    """
    if (os.geteuid(), os.getegid()) == (identity.uid, identity.gid):
        log.info("running as %s:%s already", identity.user, identity.group)
        return
    blocked = unreadable_installation(identity)
    if blocked is not None:
        raise OSError(
            errno.EACCES,
            f"gateway.user: {identity.user} cannot read {blocked}, where this Python and l4gw "
            "are installed; install them where that user can read them",
        )
    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"dropping privileges: {what}: {os.strerror(err)}")

    for cap in range(_CAP_PROBE_LIMIT):
        if cap in keep:
            continue
        if libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) != 1:
            continue  # absent from the bounding set, or past the kernel's last capability
        check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    try:
        os.setgroups([])
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise OSError(
            exc.errno, f"dropping privileges to {identity.user}:{identity.group}: {exc.strerror}"
        ) from exc
    check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "PR_SET_KEEPCAPS")
    words = [0, 0]
    for cap in keep:
        words[cap // 32] |= 1 << (cap % 32)
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)(*(_CapData(w, w, 0) for w in words))
    check(libc.capset(ctypes.byref(header), data), "capset")
    names = ", ".join(sorted(CAPABILITY_NAMES.get(c, str(c)) for c in keep)) or "none"
    log.info(
        "running as %s:%s (uid %d, gid %d) with capabilities: %s",
        identity.user,
        identity.group,
        identity.uid,
        identity.gid,
        names,
    )
