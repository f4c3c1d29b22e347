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

from .config import Endpoint
from .linux import IP_TRANSPARENT, IPV6_TRANSPARENT


class ConnectFailed(Exception):
    """One attempt failed; ``str()`` is short enough for a log line or span event."""


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
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # EMFILE/ENFILE: out of descriptors
        raise ConnectFailed(f"no socket: {exc.strerror}")
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            _bind_transparent(sock, family, source)
        err = sock.connect_ex((endpoint.host, endpoint.port))
        if err not in (0, errno.EINPROGRESS):
            raise ConnectFailed(os.strerror(err))
        if err:
            with trio.move_on_after(timeout) as scope:
                await wait_writable(sock)
            if scope.cancelled_caught:
                raise ConnectFailed(f"timed out after {timeout:g}s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
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
