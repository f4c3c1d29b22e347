"""Linux constants that Python's ``socket`` module does not export everywhere.

Each value names the kernel header it comes from; where ``socket`` has the
name we take it from there.
"""

from __future__ import annotations

import socket

# linux/in.h: IP_TRANSPARENT = 19
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
# linux/in6.h: IPV6_TRANSPARENT = 75
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)
# linux/in.h: IP_RECVORIGDSTADDR = IP_ORIGDSTADDR = 20
IP_RECVORIGDSTADDR: int = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR: int = 20
# linux/in6.h: IPV6_RECVORIGDSTADDR = IPV6_ORIGDSTADDR = 74
IPV6_RECVORIGDSTADDR: int = getattr(socket, "IPV6_RECVORIGDSTADDR", 74)
IPV6_ORIGDSTADDR: int = 74
# linux/in.h: IP_FREEBIND = 15 (bind to an address not (yet) local)
IP_FREEBIND: int = getattr(socket, "IP_FREEBIND", 15)
# linux/in.h: IP_BIND_ADDRESS_NO_PORT = 24 (defer port choice to connect())
IP_BIND_ADDRESS_NO_PORT: int = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# asm-generic/socket.h: SO_COOKIE = 57
SO_COOKIE: int = getattr(socket, "SO_COOKIE", 57)
# linux/tcp.h: TCP_WINDOW_CLAMP = 10
TCP_WINDOW_CLAMP: int = getattr(socket, "TCP_WINDOW_CLAMP", 10)
# linux/tcp.h: TCP_INFO = 11
TCP_INFO: int = getattr(socket, "TCP_INFO", 11)
# asm-generic/socket.h: SO_RCVLOWAT = 18
SO_RCVLOWAT: int = getattr(socket, "SO_RCVLOWAT", 18)
