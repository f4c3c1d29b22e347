"""gateway/listeners.py with real sockets: what open_socket sets and how a failed bind
reads, and the accept loop at its connection cap ("wait" leaves connections in the
kernel backlog, "refuse" hands them to the refuse callback) and at close."""

from __future__ import annotations

import errno
import socket
import tomllib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from gateway import listeners
from gateway.config import ListenerConfig, from_dict
from gateway.listeners import Listener, open_socket

# Not on this host (and never sent to: only bound).
NON_LOCAL_V4 = "198.19.255.254"
NON_LOCAL_V6 = "fd00:ffff::1"


def listener_config(**keys: Any) -> ListenerConfig:
    """The ``[[listener]]`` named "public" with ``keys``, through the config validator."""
    keys = {"name": "public", "bind": "127.0.0.1:0", **keys}
    text = "[[listener]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    return from_dict(tomllib.loads(text), "test.toml", {}).listeners[0]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, int) else f'"{value}"'


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """Sockets a test opens, closed when it ends."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


# --- open_socket ---------------------------------------------------------------------


def test_listens_non_blocking(opened: list[socket.socket]) -> None:
    sock = open_socket(listener_config())
    opened.append(sock)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert not sock.getblocking()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
    client = socket.create_connection(("127.0.0.1", port_of(sock)), timeout=5)
    opened.append(client)
    conn, peer = sock.accept()
    opened.append(conn)
    assert peer == client.getsockname()


def test_reuse_port_lets_workers_share_the_port(opened: list[socket.socket]) -> None:
    first = open_socket(listener_config(), reuse_port=True)
    opened.append(first)
    lc = listener_config(bind=f"127.0.0.1:{port_of(first)}")
    opened.append(open_socket(lc, reuse_port=True))
    with pytest.raises(OSError) as info:
        opened.append(open_socket(lc))
    assert info.value.errno == errno.EADDRINUSE


def test_ipv6_listener_is_v6_only(opened: list[socket.socket]) -> None:
    sock = open_socket(listener_config(bind="[::1]:0"))
    opened.append(sock)
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_port_in_use_names_the_listener_and_the_fix(opened: list[socket.socket]) -> None:
    holder = socket.socket()
    opened.append(holder)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = port_of(holder)
    with pytest.raises(OSError) as info:
        open_socket(listener_config(bind=f"127.0.0.1:{port}"))
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == (
        f"[Errno {errno.EADDRINUSE}] listener public (127.0.0.1:{port}): Address already in "
        "use (another process holds it (ss -ltnp or ss -lunp shows which))"
    )


@pytest.mark.parametrize("host", [NON_LOCAL_V4, f"[{NON_LOCAL_V6}]"])
def test_address_not_on_this_host(host: str) -> None:
    with pytest.raises(OSError) as info:
        open_socket(listener_config(name="edge", bind=f"{host}:8443"))
    assert info.value.errno == errno.EADDRNOTAVAIL
    message = str(info.value)
    assert f"listener edge ({host}:8443): Cannot assign requested address" in message
    assert "the address is not on this host" in message
    assert "transparent = true binds a non-local address for TPROXY" in message


@pytest.mark.privileged
@pytest.mark.parametrize("host", [NON_LOCAL_V4, f"[{NON_LOCAL_V6}]"])
def test_transparent_listener_binds_a_non_local_address(
    opened: list[socket.socket], host: str
) -> None:
    sock = open_socket(listener_config(bind=f"{host}:0", transparent=True))
    opened.append(sock)
    assert sock.getsockname()[0] == host.strip("[]")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def test_identity_is_what_keeps_a_socket_across_a_reload(opened: list[socket.socket]) -> None:
    sock = socket.socket()
    opened.append(sock)
    same = Listener(listener_config(max_connections=5), sock).identity()
    assert Listener(listener_config(max_connections=9), sock).identity() == same
    assert Listener(listener_config(backlog=16), sock).identity() != same
    assert Listener(listener_config(bind="127.0.0.1:1"), sock).identity() != same


# --- the accept loop -----------------------------------------------------------------


class Loop:
    """A Listener's accept loop with recording spawn and refuse callbacks."""

    def __init__(self, lc: ListenerConfig) -> None:
        self.listener = Listener(lc, open_socket(lc))
        self.port = port_of(self.listener.sock)
        self.spawned: list[tuple[socket.socket, Any]] = []
        self.refused: list[tuple[socket.socket, Any]] = []
        self.clients: list[socket.socket] = []
        self.returned = False

    def spawn(self, listener: Listener, conn: socket.socket, peer: Any) -> None:
        assert listener is self.listener
        self.spawned.append((conn, peer))

    def refuse(self, listener: Listener, conn: socket.socket, peer: Any) -> None:
        assert listener is self.listener
        self.refused.append((conn, peer))
        conn.close()

    async def run(self) -> None:
        await self.listener.accept_loop(self.spawn, self.refuse)
        self.returned = True

    def connect(self) -> socket.socket:
        # On loopback the handshake completes in the kernel, accepted or not.
        host = self.listener.sock.getsockname()[0]
        client = socket.create_connection((host, self.port), timeout=5)
        self.clients.append(client)
        return client

    async def settle(self) -> None:
        """Until nothing more will happen without an outside event."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)

    def close(self) -> None:
        for conn, _ in self.spawned:
            conn.close()
        for client in self.clients:
            client.close()
        if self.listener.sock.fileno() != -1:
            self.listener.close()


@pytest.fixture(params=["compiled", "python"])
def accept(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The accept loop's accept both ways: ``_copystep.accept`` and the socket module's."""
    if request.param == "compiled":
        if not listeners.COMPILED_ACCEPT:
            pytest.skip("gateway.relay._copystep is not built")
    else:
        monkeypatch.setattr(listeners, "COMPILED_ACCEPT", False)
    return str(request.param)


@pytest.fixture
async def loops() -> AsyncIterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    for loop in made:
        loop.close()


@pytest.mark.usefixtures(accept.__name__)
@pytest.mark.parametrize(("policy", "bind"), [("wait", "127.0.0.1:0"), ("refuse", "[::1]:0")])
async def test_under_the_cap_every_connection_is_spawned(
    loops: list[Loop], policy: str, bind: str
) -> None:
    loop = Loop(listener_config(max_connections=3, on_max_connections=policy, bind=bind))
    loops.append(loop)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            clients = [loop.connect() for _ in range(3)]
            await loop.settle()
            nursery.cancel_scope.cancel()
    assert [peer for _, peer in loop.spawned] == [c.getsockname() for c in clients]
    assert loop.listener.active == 3
    for conn, _ in loop.spawned:
        assert not conn.getblocking()
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_at_the_cap_wait_leaves_connections_in_the_backlog(loops: list[Loop]) -> None:
    loop = Loop(listener_config(max_connections=2, on_max_connections="wait"))
    loops.append(loop)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            clients = [loop.connect() for _ in range(4)]
            await loop.settle()
            assert len(loop.spawned) == 2
            assert not loop.refused
            # One connection ends: exactly one more is taken from the backlog.
            loop.listener.released()
            await loop.settle()
            assert [peer for _, peer in loop.spawned] == [c.getsockname() for c in clients[:3]]
            loop.listener.released()
            await loop.settle()
            nursery.cancel_scope.cancel()
    assert [peer for _, peer in loop.spawned] == [c.getsockname() for c in clients]
    assert not loop.refused
    assert loop.listener.active == 2


async def test_at_the_cap_refuse_hands_the_connection_to_refuse(loops: list[Loop]) -> None:
    loop = Loop(listener_config(max_connections=2, on_max_connections="refuse"))
    loops.append(loop)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            clients = [loop.connect() for _ in range(4)]
            await loop.settle()
            assert [peer for _, peer in loop.spawned] == [c.getsockname() for c in clients[:2]]
            assert [peer for _, peer in loop.refused] == [c.getsockname() for c in clients[2:]]
            assert loop.listener.active == 2
            # Below the cap again: the next connection is served.
            loop.listener.released()
            late = loop.connect()
            await loop.settle()
            nursery.cancel_scope.cancel()
    assert loop.spawned[-1][1] == late.getsockname()
    assert len(loop.refused) == 2
    # The refused connections were closed: their clients see the end.
    for client in clients[2:]:
        client.settimeout(5)
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass


async def test_close_ends_the_loop_and_frees_the_port(loops: list[Loop]) -> None:
    loop = Loop(listener_config())
    loops.append(loop)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            loop.connect()
            await loop.settle()
            loop.listener.close()
    assert loop.returned
    assert len(loop.spawned) == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", loop.port), timeout=5).close()
    # The same port can be opened again at once (a reload that moves a listener back).
    again = open_socket(listener_config(bind=f"127.0.0.1:{loop.port}"))
    again.close()


async def test_cancelling_the_loop_closes_the_socket(loops: list[Loop]) -> None:
    loop = Loop(listener_config())
    loops.append(loop)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            await loop.settle()
            nursery.cancel_scope.cancel()
    assert loop.listener.sock.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", loop.port), timeout=5).close()


async def test_a_connection_that_cannot_be_wrapped_is_closed_and_the_loop_goes_on(
    loops: list[Loop], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop wraps each accepted descriptor itself (the raw accept): when wrapping
    fails (its getsockname check), the descriptor is closed, not leaked, and the next
    connection is served. The failure is injected: a real socket never fails it."""
    real = socket.socket
    failed: list[int] = []

    def wrap(*args: Any, **kwargs: Any) -> socket.socket:
        if len(args) == 4 and not failed:
            failed.append(args[3])
            raise OSError(errno.ENOBUFS, "injected")
        return real(*args, **kwargs)

    loop = Loop(listener_config())
    loops.append(loop)
    monkeypatch.setattr("gateway.listeners.socket.socket", wrap)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop.run)
            first = loop.connect()
            await loop.settle()
            second = loop.connect()
            await loop.settle()
            nursery.cancel_scope.cancel()
    assert len(failed) == 1
    first.settimeout(5)
    assert first.recv(1) == b""  # closed: the client sees the end (its number is reused)
    assert [peer for _, peer in loop.spawned] == [second.getsockname()]
