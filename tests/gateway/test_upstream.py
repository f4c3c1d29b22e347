"""gateway/upstream.py against real loopback listeners: connected, refused, timed out
(a listener whose accept queue is full drops the SYN), reset right after the
handshake, and the transparent bind to the client's address."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from gateway.config import Endpoint
from gateway.upstream import ConnectFailed, ResetAfterConnect, connect

from backends import reset_next_handshake, stalled_listener
from gwproc import free_port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(8)
    lsn.settimeout(5)
    yield lsn
    lsn.close()


@pytest.fixture
def full_listener() -> Iterator[socket.socket]:
    with stalled_listener() as lsn:
        yield lsn


def endpoint_of(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


async def test_connects_to_a_listener(listener: socket.socket) -> None:
    with trio.fail_after(10):
        sock = await connect(endpoint_of(listener), 2)
    with sock:
        backend, peer = listener.accept()
        with backend:
            assert peer == sock.getsockname()
            assert sock.getpeername() == listener.getsockname()
            assert not sock.getblocking()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            sock.send(b"ping")
            assert backend.recv(4) == b"ping"


async def test_connects_over_ipv6() -> None:
    try:
        lsn = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        lsn.bind(("::1", 0))
    except OSError as exc:
        pytest.fail(f"no IPv6 loopback on this host: {exc}")
    with lsn:
        lsn.listen(1)
        lsn.settimeout(5)
        with trio.fail_after(10):
            sock = await connect(Endpoint("::1", lsn.getsockname()[1]), 2)
        with sock:
            assert sock.family == socket.AF_INET6
            backend, _ = lsn.accept()
            backend.close()


async def test_refused() -> None:
    port = free_port()
    with trio.fail_after(10), pytest.raises(ConnectFailed) as info:
        await connect(Endpoint("127.0.0.1", port), 2)
    assert not isinstance(info.value, ResetAfterConnect)
    assert str(info.value) == "Connection refused"


async def test_timeout_to_an_address_that_does_not_answer(full_listener: socket.socket) -> None:
    with trio.fail_after(10), pytest.raises(ConnectFailed, match=r"^timed out after 0\.3s$"):
        await connect(endpoint_of(full_listener), 0.3)


async def test_reset_right_after_the_handshake(full_listener: socket.socket) -> None:
    """The backend accepts and resets before the gateway sees the connection up:
    ResetAfterConnect, which the caller does not retry elsewhere."""
    failed: list[BaseException] = []

    async def attempt() -> None:
        try:
            sock = await connect(endpoint_of(full_listener), 5)
        except ConnectFailed as exc:
            failed.append(exc)
        else:
            sock.close()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt)
            # The SYN was dropped: the attempt waits for the handshake.
            await trio.testing.wait_all_tasks_blocked()
            reset_next_handshake(full_listener)
    assert len(failed) == 1
    assert isinstance(failed[0], ResetAfterConnect)
    assert str(failed[0]) == "reset by the backend right after connect"


@pytest.mark.parametrize(
    ("host", "source", "expected"),
    [
        ("127.0.0.1", ("::1", 0), "client ::1 is IPv6 but the endpoint is IPv4"),
        ("::1", ("127.0.0.1", 0), "client 127.0.0.1 is IPv4 but the endpoint is IPv6"),
    ],
)
async def test_transparent_source_of_the_other_family(
    host: str, source: tuple[str, int], expected: str
) -> None:
    with trio.fail_after(10), pytest.raises(ConnectFailed, match=f"^{expected}$"):
        await connect(Endpoint(host, free_port(host)), 2, source)


@pytest.mark.privileged
async def test_transparent_source_is_what_the_backend_sees(listener: socket.socket) -> None:
    """``upstream_source = "client"``: the backend sees the client's address."""
    with trio.fail_after(10):
        sock = await connect(endpoint_of(listener), 2, ("127.0.0.2", 0))
    with sock:
        backend, peer = listener.accept()
        backend.close()
    assert peer[0] == "127.0.0.2"


@pytest.mark.privileged
async def test_transparent_bind_conflict_is_a_connect_failure(listener: socket.socket) -> None:
    """The client's exact address and port already taken: a clear ConnectFailed."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with taken:
        taken.bind(("127.0.0.3", 0))
        taken.listen(1)
        source = taken.getsockname()
        with trio.fail_after(10), pytest.raises(ConnectFailed) as info:
            await connect(endpoint_of(listener), 2, source)
    assert str(info.value) == f"transparent bind to 127.0.0.3: {os.strerror(errno.EADDRINUSE)}"
