"""gateway.tproxy.sockdiag: listening sockets and their IP_TRANSPARENT flag, from the kernel."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from gateway.linux import IP_TRANSPARENT, IPV6_TRANSPARENT
from gateway.tproxy.sockdiag import ListeningSocket, listening


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def listen(opened: list[socket.socket], host: str, transparent: bool) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    opened.append(s)
    if transparent:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    s.bind((host, 0))
    s.listen()
    port: int = s.getsockname()[1]
    return port


@pytest.mark.timeout(10)
def test_plain_listener_is_reported_not_transparent(sockets: list[socket.socket]) -> None:
    port4 = listen(sockets, "127.0.0.1", transparent=False)
    port6 = listen(sockets, "::1", transparent=False)
    assert ListeningSocket("127.0.0.1", port4, False) in listening(socket.AF_INET)
    assert ListeningSocket("::1", port6, False) in listening(socket.AF_INET6)


@pytest.mark.privileged
@pytest.mark.timeout(10)
def test_transparent_listener_is_reported_transparent(sockets: list[socket.socket]) -> None:
    port4 = listen(sockets, "127.0.0.1", transparent=True)
    port6 = listen(sockets, "::1", transparent=True)
    assert ListeningSocket("127.0.0.1", port4, True) in listening(socket.AF_INET)
    assert ListeningSocket("::1", port6, True) in listening(socket.AF_INET6)
