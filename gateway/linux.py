"""Linux constants that Python's ``socket`` module does not export everywhere.

Each value names the kernel header it comes from; where ``socket`` has the
name we take it from there. This is their one source: no other module
defines them again, and each one here is used (tests/gateway/test_linux.py).
"""

from __future__ import annotations

import fcntl
import socket
import termios

# --- transparent sockets, original destinations (listeners, upstream, gateway/udp/) ---
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

# --- peeking (gateway/peek.py) ---
# asm-generic/socket.h: SO_RCVLOWAT = 18
SO_RCVLOWAT: int = getattr(socket, "SO_RCVLOWAT", 18)

# --- the sockmap tier (gateway/relay/sockmap.py) ---
# asm-generic/socket.h: SO_COOKIE = 57
SO_COOKIE: int = getattr(socket, "SO_COOKIE", 57)
# linux/tcp.h: TCP_INFO = 11
TCP_INFO: int = getattr(socket, "TCP_INFO", 11)

# --- TPROXY plumbing (gateway/tproxy/state.py, gateway/tproxy/sockdiag.py) ---
# linux/capability.h: CAP_NET_ADMIN = 12 (a bit of CapEff in /proc/self/status)
CAP_NET_ADMIN: int = 12
# linux/rtnetlink.h: RT_SCOPE_HOST = 254 (an IPv4 "local" route has host scope)
RT_SCOPE_HOST: int = 254
# linux/rtnetlink.h: RTN_LOCAL = 2 (route type: deliver locally)
RTN_LOCAL: int = 2
# linux/fib_rules.h: FR_ACT_TO_TBL = 1 (rule action: look up a table)
FR_ACT_TO_TBL: int = 1
# linux/netlink.h: NETLINK_SOCK_DIAG = 4
NETLINK_SOCK_DIAG: int = getattr(socket, "NETLINK_SOCK_DIAG", 4)
# linux/sock_diag.h: SOCK_DIAG_BY_FAMILY = 20
SOCK_DIAG_BY_FAMILY: int = 20
# linux/inet_diag.h: INET_DIAG_SOCKOPT = 22 (struct inet_diag_sockopt, kernel >= 5.10)
INET_DIAG_SOCKOPT: int = 22
# net/tcp_states.h: TCP_LISTEN = 10
TCP_LISTEN: int = 10

# --- UDP sessions (gateway/udp/listener.py, gateway/udp/sockets.py) ---
# asm-generic/socket.h: SO_RCVBUFFORCE = 33 (SO_RCVBUF past net.core.rmem_max, CAP_NET_ADMIN)
SO_RCVBUFFORCE: int = getattr(socket, "SO_RCVBUFFORCE", 33)
# linux/in.h: IP_PKTINFO = 8 (struct in_pktinfo: the local address a datagram was sent to,
# and on send the source address to use)
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
# linux/in6.h: IPV6_RECVPKTINFO = 49, IPV6_PKTINFO = 50 (struct in6_pktinfo)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)

# --- telemetry and workers (gateway/telemetry/pipe.py, gateway/telemetry/exporter.py,
# gateway/workers.py) ---
# asm-generic/socket.h: SO_SNDBUFFORCE = 32 (SO_SNDBUF past net.core.wmem_max, CAP_NET_ADMIN)
SO_SNDBUFFORCE: int = getattr(socket, "SO_SNDBUFFORCE", 32)
# linux/prctl.h: PR_SET_PDEATHSIG = 1 (signal sent to this process when its parent dies)
PR_SET_PDEATHSIG: int = 1

# --- privileges (gateway/process.py) ---
# linux/capability.h: CAP_NET_BIND_SERVICE = 10
CAP_NET_BIND_SERVICE: int = 10

# --- the shield (gateway/shield/attach.py) ---
# linux/sockios.h: SIOCETHTOOL = 0x8946; linux/ethtool.h: ETHTOOL_GDRVINFO = 3 (the driver's name)
SIOCETHTOOL: int = 0x8946
ETHTOOL_GDRVINFO: int = 3

# --- socket queue counters (gateway/relay/) ---
# asm-generic/ioctls.h: FIONREAD = SIOCINQ = 0x541B (bytes received, not read yet)
SIOCINQ: int = termios.FIONREAD
# asm-generic/ioctls.h: TIOCOUTQ = SIOCOUTQ = 0x5411 (linux/sockios.h: bytes not yet ACKed)
SIOCOUTQ: int = termios.TIOCOUTQ


def ioctl_int(fd: int, request: int) -> int:
    """One of the int-valued socket ioctls above (``SIOCINQ``, ``SIOCOUTQ``) for ``fd``.

    Raises:
        OSError: ``fd`` is closed or not a socket.
    """
    return int.from_bytes(fcntl.ioctl(fd, request, b"\0\0\0\0"), "little", signed=True)
