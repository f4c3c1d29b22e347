"""UDP sockets: the listener's, each session's upstream one, and the reply sockets.

What gateway/udp/listener.py needs from the kernel, with the socket options each one
takes and why: IP_TRANSPARENT and IP_RECVORIGDSTADDR for TPROXY'd
listeners, IP_PKTINFO for wildcard ones, a transparent bind to the client's
IP and port upstream, a transparent bind to the original destination for
replies (kernel Documentation/networking/tproxy.rst).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from gateway.config import Endpoint, ListenerConfig
from gateway.linux import (
    IP_PKTINFO,
    IP_RECVORIGDSTADDR,
    IP_TRANSPARENT,
    IPV6_RECVORIGDSTADDR,
    IPV6_RECVPKTINFO,
    IPV6_TRANSPARENT,
    SO_RCVBUFFORCE,
)
from gateway.listeners import bind_error
from gateway.schema import format_address
from gateway.upstream import ConnectFailed

LISTENER_RCVBUF = 4 * 1024 * 1024
"""Receive buffer asked for the listener socket: it takes every client's datagrams."""


def open_udp_socket(lc: ListenerConfig) -> socket.socket:
    """Bind a UDP listener socket as ``lc`` says.

    Transparent: IP_TRANSPARENT and IP_RECVORIGDSTADDR, so each datagram brings its
    original destination. On a wildcard address: IP_PKTINFO, so each datagram
    brings the address it was sent to, which its replies must leave from.

    Raises:
        OSError: with the listener's name and address in the message; also for
            ``proxy_protocol = true``, which has no UDP form here.
    """
    if lc.proxy_protocol:
        # A PROXY header per datagram from a trusted proxy would need the replies to
        # go back through it with a header too: no such convention to follow.
        raise OSError(errno.EINVAL, f"listener {lc.name} ({lc.bind}): proxy_protocol is TCP only")
    sock = socket.socket(lc.family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if lc.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if lc.transparent:
            _set_transparent(sock, lc.family)
        elif ipaddress.ip_address(lc.host).is_unspecified:
            if lc.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        _grow_receive_buffer(sock)
        sock.bind((lc.host, lc.port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise bind_error(f"listener {lc.name} ({lc.bind})", exc) from exc
    return sock


def _set_transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)


def _grow_receive_buffer(sock: socket.socket) -> None:
    # The default (net.core.rmem_default, ~208 KiB) holds a few dozen full-size
    # datagrams: a burst from many clients would be dropped by the kernel before
    # the loop runs. Past rmem_max only with CAP_NET_ADMIN.
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, LISTENER_RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF)


class UpstreamFailed(ConnectFailed):
    """A session's upstream socket could not be made; ``str()`` is short (a failed
    attempt of the connect loop, gateway/decisions.py)."""


def open_upstream(endpoint: Endpoint, source: tuple[str, int] | None) -> socket.socket:
    """A non-blocking UDP socket connected to ``endpoint``.

    Args:
        endpoint: the backend.
        source: bind here first, transparently (``upstream_source = "client"``:
            the client's IP *and port*, so the backend sees both). Port 0: the
            kernel chooses one that no other socket on that IP uses.

    Raises:
        UpstreamFailed: no socket, the transparent bind was refused, no route.
    """
    family = endpoint.family
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise UpstreamFailed(f"no socket: {exc.strerror}")
    try:
        sock.setblocking(False)
        if source is not None:
            if (":" in source[0]) != (family == socket.AF_INET6):
                raise UpstreamFailed(
                    f"client {source[0]} and endpoint {endpoint} are different IP versions"
                )
            if source[1]:
                # The same client port may talk to two destinations (two sessions). Not
                # with port 0: the kernel would then count ports we use as free.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
            option = IPV6_TRANSPARENT if family == socket.AF_INET6 else IP_TRANSPARENT
            sock.setsockopt(level, option, 1)
            try:
                sock.bind(source)
            except OSError as exc:
                where = format_address(*source)
                raise UpstreamFailed(f"transparent bind to {where}: {exc.strerror}")
        try:
            sock.connect((endpoint.host, endpoint.port))
        except OSError as exc:
            raise UpstreamFailed(exc.strerror or str(exc))
        return sock
    except BaseException:
        sock.close()
        raise


def open_reply_socket(destination: tuple[str, int]) -> socket.socket:
    """A transparent UDP socket bound to ``destination`` (not a local address), for
    replies that must come from there; it reports each datagram's destination too.

    Raises:
        OSError: the bind failed (e.g. no CAP_NET_ADMIN).
    """
    family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _set_transparent(sock, family)
        sock.bind(destination)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
