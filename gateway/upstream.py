"""Connecting to backends: one socket per attempt, built by hand.

Built by hand rather than with ``trio.open_tcp_stream`` because the gateway
needs control that happy-eyeballs hides (reference/conventions.md C.6): a
transparent bind to the client's own address, one endpoint per attempt with
its own timeout, and the raw socket for the kernel relay tiers.
"""

from __future__ import annotations

import errno
import os
import socket

import trio
from trio.lowlevel import wait_writable

from gateway.config import Endpoint
from gateway.linux import IP_TRANSPARENT, IPV6_TRANSPARENT


class ConnectFailed(Exception):
    """One attempt failed; ``str()`` is short enough for a log line or span event."""


class ResetAfterConnect(ConnectFailed):
    """The backend accepted, then reset before the gateway saw the connection up.

    Not worth a retry elsewhere: the backend has seen the connection (and
    may have acted on it), so the client must see a reset too.
    """


async def connect(
    endpoint: Endpoint, timeout: float, source: tuple[str, int] | None = None
) -> socket.socket:
    """Open a non-blocking TCP connection to ``endpoint`` within ``timeout`` seconds.

    Args:
        endpoint: the backend.
        timeout: seconds for the handshake.
        source: bind here first with IP_TRANSPARENT (``upstream_source =
            "client"``: the backend sees the client's address). Port 0 lets
            the kernel choose.

    Raises:
        ConnectFailed: refused, unreachable, timed out, or the transparent
            bind was not allowed.
    """
    family = endpoint.family
    try:
        # Non-blocking from socket() on: no separate setblocking() syscall.
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    except OSError as exc:  # EMFILE/ENFILE: out of descriptors
        raise ConnectFailed(f"no socket: {exc.strerror}")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            _bind_transparent(sock, family, source)
        address = (endpoint.host, endpoint.port)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            # To a local listener (loopback, a sidecar) the handshake is over
            # before connect() returns. Asking again costs one syscall and,
            # when it is over, saves a cancel scope, an epoll registration and
            # a trip through the scheduler: ~5% of the gateway's CPU per
            # connection (bench/README.md). Linux answers 0 once connected,
            # EALREADY while the SYN is out, or the connect error itself.
            err = sock.connect_ex(address)
            if err in (errno.EALREADY, errno.EINPROGRESS):
                err = errno.EINPROGRESS
            elif err == errno.EISCONN:
                err = 0
        if err == errno.EINPROGRESS:
            with trio.move_on_after(timeout) as scope:
                await wait_writable(sock)
            if scope.cancelled_caught:
                raise ConnectFailed(f"timed out after {timeout:g}s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == errno.ECONNRESET:
            # A refused SYN reads ECONNREFUSED; a reset means the connection
            # was up (on loopback the reset can even come within connect()).
            raise ResetAfterConnect("reset by the backend right after connect")
        if err:
            raise ConnectFailed(os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


def _bind_transparent(
    sock: socket.socket, family: socket.AddressFamily, source: tuple[str, int]
) -> None:
    host = source[0]
    if family == socket.AF_INET6:
        if ":" not in host:
            raise ConnectFailed(f"client {host} is IPv4 but the endpoint is IPv6")
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        if ":" in host:
            raise ConnectFailed(f"client {host} is IPv6 but the endpoint is IPv4")
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    try:
        sock.bind((host, source[1]))
    except OSError as exc:
        raise ConnectFailed(f"transparent bind to {host}: {exc.strerror}")
