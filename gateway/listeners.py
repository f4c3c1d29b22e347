"""Listening sockets and the accept loop.

The accept loop keeps serving through the errors a busy or attacked server
sees: running out of file descriptors (EMFILE/ENFILE: back off, the
connections wait in the kernel backlog), a client that resets before it is
accepted (ECONNABORTED) and transient kernel memory pressure.

A bind that fails says which socket (listener name and address, or the admin
endpoint), the kernel's words, and, for the causes an operator meets in
practice, what to change (:func:`bind_error`, for every listening socket:
TCP, UDP and the admin endpoint). The message goes to a one-line log entry,
never a traceback (gateway/cli/common.py: start-up failures).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio.lowlevel import checkpoint, wait_readable

from gateway.config import ListenerConfig
from gateway.linux import IP_TRANSPARENT, IPV6_TRANSPARENT

try:
    from gateway.relay import _copystep
except ImportError:  # not built (L4GW_NO_EXT=1): the socket module's accept
    _copystep = None  # type: ignore[assignment]

log = logging.getLogger("l4gw.listener")

_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
_ACCEPTS_PER_CHECKPOINT = 64
_BIND_HINTS = {
    errno.EADDRINUSE: "another process holds it (ss -ltnp or ss -lunp shows which)",
    errno.EADDRNOTAVAIL: "the address is not on this host "
    "(transparent = true binds a non-local address for TPROXY)",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EPERM: "transparent sockets need CAP_NET_ADMIN",
}


def bind_error(what: str, exc: OSError) -> OSError:
    """``exc`` with ``what`` (e.g. ``listener public (0.0.0.0:80)``) and a hint in its message.

    Args:
        what: the socket, as the operator names it in the config.
        exc: the error from ``bind``/``listen``/``setsockopt``.
    """
    hint = _BIND_HINTS.get(exc.errno or 0)
    text = f"{what}: {exc.strerror or exc}" + (f" ({hint})" if hint else "")
    return OSError(exc.errno, text)


def open_socket(lc: ListenerConfig, reuse_port: bool = False) -> socket.socket:
    """Bind and listen as ``lc`` says; ``reuse_port`` when worker processes share it.

    Raises:
        OSError: with the listener's name and address in the message.
    """
    sock = socket.socket(lc.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # The kernel spreads new connections over the workers' sockets.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if lc.family == socket.AF_INET6:
            # Explicit, so that "0.0.0.0:p" and "[::]:p" can be two listeners.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if lc.transparent:
            if lc.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        # Accepted sockets inherit it (Linux copies the listener's TCP options
        # into each child): one setsockopt per listener instead of per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((lc.host, lc.port))
        sock.listen(lc.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise bind_error(f"listener {lc.name} ({lc.bind})", exc) from exc
    return sock


def _fixed_local_address(config: ListenerConfig, sock: socket.socket) -> tuple[str, int] | None:
    if config.transparent:
        return None  # TPROXY: the original destination differs per connection
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    if ipaddress.ip_address(host).is_unspecified:
        return None  # 0.0.0.0 / [::]: the address the client chose
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # as gateway.flow.unmap spells it
    return host, port


COMPILED_ACCEPT = _copystep is not None
"""Whether accept loops started from now on accept with ``_copystep.accept`` (an
IPv4 or IPv6 listener, the module built); the tests set it False to run the socket
module's."""


def _python_accept(lsock: socket.socket) -> tuple[int, Any] | None:
    try:
        fd_peer: tuple[int, Any] = lsock._accept()  # type: ignore[attr-defined]
    except BlockingIOError:
        return None
    return fd_peer


def _accepter(family: int) -> tuple[Callable[[socket.socket], tuple[int, Any] | None], int]:
    """``accept(lsock)``: a waiting connection's (fd, peer), or None when none waits;
    and the socket type that wraps its fd (with SOCK_NONBLOCK: non-blocking already)."""
    if COMPILED_ACCEPT and _copystep is not None and family in (socket.AF_INET, socket.AF_INET6):
        return _copystep.accept, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
    return _python_accept, socket.SOCK_STREAM


class Listener:
    """One open listener: its socket, its accept loop, its connection count."""

    def __init__(self, config: ListenerConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.local = _fixed_local_address(config, sock)
        """The local address of every connection it accepts, when one address is
        all it can be (bound to one address, not transparent); else None and each
        connection asks its own socket (getsockname: one syscall per connection)."""
        self.active = 0
        self.scope = trio.CancelScope()
        self._slot: trio.Event | None = None
        """Set when a connection ends, while the accept loop waits for one to (at
        ``max_connections``); None while it does not wait."""
        self._last_backoff_log = 0.0
        self.ended: Callable[[], None] | None = None
        """Called as each connection it accepted ends (the server's count of them)."""

    def identity(self) -> tuple[Any, ...]:
        """Listeners with the same identity keep their socket across a reload."""
        c = self.config
        return (c.name, c.protocol, c.host, c.port, c.transparent, c.backlog)

    def close(self) -> None:
        """Stop accepting now: the port is free when this returns."""
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
        self.scope.cancel()

    def released(self) -> None:
        self.active -= 1
        slot = self._slot
        if slot is not None:
            self._slot = None
            slot.set()

    async def accept_loop(
        self,
        spawn: Callable[[Listener, socket.socket, Any], Awaitable[None] | None],
        refuse: Callable[[Listener, socket.socket, Any], None],
    ) -> None:
        """Accept until cancelled; ``spawn`` starts each connection's task, ``refuse``
        resets and records one accepted past ``max_connections``."""
        lsock = self.sock
        # socket.accept() converts the listener's family and type to enums for every
        # connection it wraps (~1.5 µs); a raw accept and the plain constructor, with
        # the family read once, do without that. The compiled one (_copystep.accept)
        # also makes the connection non-blocking in accept4 itself, where the socket
        # module's needs an ioctl, writes an IPv4 peer without inet_ntop's sprintf,
        # and says "none waits" without an exception.
        family = int(lsock.family)
        accept, kind = _accepter(family)
        made_nonblocking = kind != socket.SOCK_STREAM
        accepted = 0
        with self.scope:
            try:
                while True:
                    cap = self.config.max_connections
                    while self.active >= cap and self.config.on_max_connections == "wait":
                        # Leave new connections in the kernel backlog.
                        self._slot = slot = trio.Event()
                        await slot.wait()
                    try:
                        got = accept(lsock)
                    except OSError as exc:
                        if lsock.fileno() == -1:
                            return
                        if exc.errno in _SKIP_ERRNOS:
                            continue
                        if exc.errno in _BACKOFF_ERRNOS:
                            self._log_backoff(exc)
                            await trio.sleep(0.1)
                            continue
                        raise
                    if got is None:
                        try:
                            await wait_readable(lsock)
                        except trio.ClosedResourceError:
                            return
                        continue
                    fd, peer = got
                    try:
                        conn = socket.socket(family, kind, 0, fd)
                    except OSError:
                        # Wrapping it validates it (getsockname); one that fails has
                        # nothing to serve, and the loop goes on.
                        os.close(fd)
                        continue
                    if self.active >= cap:
                        refuse(self, conn, peer)
                        continue
                    # TCP_NODELAY comes from the listening socket (open_socket).
                    if not made_nonblocking:
                        conn.setblocking(False)
                    self.active += 1
                    spawn(self, conn, peer)
                    accepted += 1
                    if accepted == _ACCEPTS_PER_CHECKPOINT:
                        accepted = 0
                        await checkpoint()
            finally:
                lsock.close()

    def _log_backoff(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_backoff_log > 5:
            self._last_backoff_log = now
            log.error(
                "listener %s: accept failed (%s); backing off, connections wait in the backlog",
                self.config.name,
                exc.strerror,
            )
