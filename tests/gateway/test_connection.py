"""gateway/connection.py: one connection's :func:`handle` on real loopback sockets, a
real backend and a minimal Runtime whose plugins are defined here.

Each test accepts one client connection itself and hands it to ``handle``, then
checks what the client and the backend saw and the one record of the flow (the
closed hook is called exactly once, whatever ended the connection).
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import AsyncIterator, Callable
from importlib.metadata import entry_points
from typing import Any

import pytest
import trio
import trio.testing

from gateway import Handover, Refusal, Route, hookimpl
from gateway.config import Config, ListenerConfig, from_dict
from gateway.connection import handle, no_route_reason, refuse_over_capacity
from gateway.flow import CloseReason, Flow
from gateway.plugin_manager import ENTRY_POINT_GROUP, load
from gateway.relay.copy import CopyRelay
from gateway.relay.stats import TierCounters
from gateway.runtime import Runtime

from backends import reset_next_handshake, stalled_listener
from gwproc import free_port
from relay_helpers import first_mismatch, payload

INSTALLED = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


class Recorder:
    """Every opened and closed flow, in order."""

    def __init__(self) -> None:
        self.opened: list[Flow] = []
        self.closed: list[Flow] = []

    @hookimpl
    def l4gw_connection_opened(self, flow: Flow) -> None:
        self.opened.append(flow)

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        assert flow.ended is not None
        self.closed.append(flow)

    def the_flow(self) -> Flow:
        """The one flow recorded: closed exactly once."""
        assert len(self.closed) == 1, self.closed
        return self.closed[0]


class Router:
    """Routes every flow to the cluster "api" (route "r")."""

    @hookimpl
    def l4gw_route(self, flow: Flow, config: Config) -> Route:
        cluster = config.clusters["api"]
        return Route("r", cluster, cluster.endpoints)


class Deny:
    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal:
        return Refusal("not you", rule="test", reset=True)


class Backend:
    """A loopback backend: reads each connection to EOF, replies ``reply`` and closes."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.port = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = bytearray()
            self.received.append(b"")
            try:
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    self.received[-1] = bytes(data)
                await stream.send_all(self.reply)
            except trio.BrokenResourceError:
                pass


def make_config(endpoints: list[str], listener: str = "", cluster: str = "") -> Config:
    listed = ", ".join(f'"{e}"' for e in endpoints)
    text = "\n".join(
        [
            "[gateway]",
            "log_connections = true",
            "[[listener]]",
            'name = "public"',
            'bind = "127.0.0.1:0"',
            listener,
            "[[route]]",
            'listener = "public"',
            'cluster = "api"',
            "[cluster.api]",
            f"endpoints = [{listed}]",
            cluster,
        ]
    )
    return from_dict(tomllib.loads(text), "test.toml", {})


class Rig:
    """A gateway of one connection: the runtime, the listening socket, a client."""

    def __init__(self, config: Config, **plugins: object) -> None:
        self.recorder = Recorder()
        loaded = load(disabled=INSTALLED, extra={**plugins, "recorder": self.recorder})
        self.rt = Runtime(config, loaded, CopyRelay(config.gateway.buffer_size), {})
        self.lc: ListenerConfig = config.listeners[0]
        self.lsn = socket.socket()
        self.lsn.bind(("127.0.0.1", 0))
        self.lsn.listen(8)
        self.lsn.settimeout(5)
        self.draining = False
        self.client: trio.SocketStream | None = None

    async def connect(self) -> tuple[trio.SocketStream, socket.socket, Any]:
        """The client's stream and the gateway's accepted socket (non-blocking) and peer."""
        self.client = await trio.open_tcp_stream(*self.lsn.getsockname())
        sock, peer = self.lsn.accept()
        sock.setblocking(False)
        return self.client, sock, peer

    async def serve(self, nursery: trio.Nursery) -> trio.SocketStream:
        """Accept one connection and start ``handle`` on it."""
        client, sock, peer = await self.connect()
        nursery.start_soon(handle, self.rt, self.lc, sock, peer, lambda: self.draining)
        return client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        self.lsn.close()


@pytest.fixture
async def rigs() -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(config: Config, **plugins: object) -> Rig:
        made.append(Rig(config, **plugins))
        return made[-1]

    yield make
    for rig in made:
        await rig.close()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


async def ended(stream: trio.SocketStream) -> None:
    """Until the gateway ends the connection. A FIN or a reset: closing a socket
    with bytes still unread in it sends a reset (RFC 2525, 2.17)."""
    try:
        await read_to_eof(stream)
    except trio.BrokenResourceError:
        pass


async def expect_reset(stream: trio.SocketStream) -> None:
    with pytest.raises(trio.BrokenResourceError):
        while await stream.receive_some(65536):
            pass
        raise AssertionError("clean EOF where a reset was expected")


# --- relayed ---------------------------------------------------------------------------


async def exchange_once(
    rigs: Callable[..., Rig], send: bytes, reply: bytes, **plugins: object
) -> tuple[Rig, Backend, trio.SocketStream, bytes]:
    """One client through a gateway of one connection (routed by :class:`Router`, and
    ``plugins``) to a :class:`Backend` that replies ``reply``: it sends ``send`` and
    its EOF, and reads to the end. Returns what it read."""
    backend = Backend(reply=reply)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"]), router=Router(), **plugins)
            client = await rig.serve(nursery)
            await client.send_all(send)
            await client.send_eof()
            got = await read_to_eof(client)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    return rig, backend, client, got


async def test_relays_to_the_backend_and_records_once(rigs: Callable[..., Rig]) -> None:
    rig, backend, client, got = await exchange_once(rigs, b"hello", b"world!")
    assert got == b"world!"
    assert backend.received == [b"hello"]
    flow = rig.recorder.the_flow()
    assert rig.recorder.opened == [flow]
    assert flow.close_reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
    assert (flow.bytes_from_client, flow.bytes_to_client) == (5, 6)
    assert (flow.route, flow.cluster, flow.endpoint) == ("r", "api", f"127.0.0.1:{backend.port}")
    assert flow.client == client.socket.getsockname()
    assert flow.destination == rig.lsn.getsockname()
    assert flow.tier == "copy"
    assert rig.rt.flows == {}


async def test_proxy_header_to_the_backend(rigs: Callable[..., Rig]) -> None:
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            config = make_config([f"127.0.0.1:{backend.port}"], cluster='proxy_protocol = "v1"')
            rig = rigs(config, router=Router())
            client = await rig.serve(nursery)
            await client.send_all(b"payload")
            await client.send_eof()
            assert await read_to_eof(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    (cport, lport) = client.socket.getsockname()[1], rig.lsn.getsockname()[1]
    assert backend.received == [
        f"PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {lport}\r\n".encode() + b"payload"
    ]


# --- handed over to a relay plugin --------------------------------------------------------


class HandingOver:
    """A relay plugin that answers one :class:`Handover` for every flow; its ``then``
    relays the rest with a copy relay of its own, after ``fail_first`` failures."""

    def __init__(self, after_bytes: int, after_seconds: float, fail_first: int = 0) -> None:
        self.counters = TierCounters()
        self.handover = Handover(after_bytes, after_seconds, self.then, self.counters)
        self.at_handover: list[tuple[int, int]] = []
        self.fail_first = fail_first

    @hookimpl
    def l4gw_relay(self, flow: Flow) -> Handover:
        return self.handover

    async def then(
        self, flow: Flow, client: socket.socket, upstream: socket.socket, idle: float
    ) -> str:
        self.at_handover.append((flow.bytes_from_client, flow.bytes_to_client))
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("no tier for it")
        flow.tier = "handed"
        closed = await CopyRelay(4096).run(client, upstream, flow, idle)
        assert closed is not None
        return closed


@pytest.mark.parametrize(
    ("after_bytes", "after_seconds"), [(1000, 60.0), (10**12, 0.0)], ids=["bytes", "seconds"]
)
@pytest.mark.parametrize("fail_first", [0, 1], ids=["relayed", "then-raises"])
async def test_a_handover_is_copied_first_then_handed_over_byte_exact(
    rigs: Callable[..., Rig], after_bytes: int, after_seconds: float, fail_first: int
) -> None:
    """The core copies until the promotion is due, then awaits ``then``; every byte
    arrives once and in order, both ways. A ``then`` that raises before moving a
    byte leaves the flow to the core's copy relay, byte-exact still."""
    up, down = payload(300_000, 1), payload(200_000, 2)
    plugin = HandingOver(after_bytes, after_seconds, fail_first)
    rig, backend, _, got = await exchange_once(rigs, up, down, relay=plugin)
    assert got == down, first_mismatch(got, down)
    assert backend.received == [up], first_mismatch(backend.received[0], up)
    flow = rig.recorder.the_flow()
    assert (flow.bytes_from_client, flow.bytes_to_client) == (len(up), len(down))
    assert flow.tier == ("copy" if fail_first else "handed")
    assert len(plugin.at_handover) == 1
    copied = sum(plugin.at_handover[0])
    # Handed over at the first chunk past the threshold, with nothing held.
    assert 0 < copied < len(up)
    if after_bytes < len(up):
        assert copied >= after_bytes
    c = plugin.counters
    assert (c.flows_now, c.flows_total, c.bytes) == (0, 1, copied)


async def test_a_flow_that_ends_while_copied_is_never_handed_over(
    rigs: Callable[..., Rig],
) -> None:
    plugin = HandingOver(after_bytes=10**12, after_seconds=60.0)
    rig, _, _, got = await exchange_once(rigs, b"hello", b"world!", relay=plugin)
    assert got == b"world!"
    flow = rig.recorder.the_flow()
    assert plugin.at_handover == [] and flow.tier == "copy"
    c = plugin.counters
    assert (c.flows_now, c.flows_total, c.bytes) == (0, 1, 11)


# --- refused before any backend -----------------------------------------------------------


async def test_no_route(rigs: Callable[..., Rig]) -> None:
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"]))
            client = await rig.serve(nursery)
            # A refusal without reset: a clean close.
            assert await read_to_eof(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.NO_ROUTE
    assert flow.refused_by == "core"
    assert flow.endpoint is None
    assert backend.received == []  # nothing is connected without a route


@pytest.mark.parametrize("ending", ["relayed", "no_route", "drained"])
async def test_done_is_called_once_after_the_record(rigs: Callable[..., Rig], ending: str) -> None:
    """``handle``'s ``done`` (the server's count of a listener's connections) runs
    once, last, however the connection ended: the flow is recorded and gone by then."""
    backend = Backend(reply=b"world!")
    seen: list[tuple[int, int]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            router = {} if ending == "no_route" else {"router": Router()}
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"]), **router)

            def done() -> None:
                seen.append((len(rig.recorder.closed), len(rig.rt.flows)))

            client, sock, peer = await rig.connect()
            nursery.start_soon(handle, rig.rt, rig.lc, sock, peer, lambda: True, None, done)
            if ending == "relayed":
                await client.send_all(b"hello")
                await client.send_eof()
                assert await read_to_eof(client) == b"world!"
            elif ending == "no_route":
                assert await read_to_eof(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # "drained": the connection is still open here
    assert seen == [(1, 0)]
    reason = rig.recorder.the_flow().close_reason
    if ending == "relayed":
        assert reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
    else:
        assert reason == {"no_route": CloseReason.NO_ROUTE, "drained": CloseReason.DRAIN}[ending]


async def test_refused_with_a_reset(rigs: Callable[..., Rig]) -> None:
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"]), router=Router(), deny=Deny())
            client = await rig.serve(nursery)
            await expect_reset(client)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.REFUSED
    assert (flow.refused_by, flow.refused_rule, flow.error) == ("deny", "test", "not you")
    assert backend.received == []


# --- the backend ----------------------------------------------------------------------


async def test_connect_failed(rigs: Callable[..., Rig]) -> None:
    port = free_port()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            rig = rigs(make_config([f"127.0.0.1:{port}"]), router=Router())
            client = await rig.serve(nursery)
            assert await read_to_eof(client) == b""
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.CONNECT_FAILED
    assert flow.error == f"127.0.0.1:{port}: Connection refused"
    assert flow.endpoint is None


async def test_backend_reset_at_connect_resets_the_client(rigs: Callable[..., Rig]) -> None:
    with stalled_listener() as stalled, trio.fail_after(10):
        port = stalled.getsockname()[1]
        config = make_config([f"127.0.0.1:{port}"], cluster='connect_timeout = "5s"')
        rig = rigs(config, router=Router())
        async with trio.open_nursery() as nursery:
            client = await rig.serve(nursery)
            await trio.testing.wait_all_tasks_blocked()
            reset_next_handshake(stalled)
            await expect_reset(client)
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.BACKEND_RESET
    assert flow.endpoint == f"127.0.0.1:{port}"


# --- PROXY header from a trusted proxy ---------------------------------------------------

TRUSTED = 'proxy_protocol = true\nproxy_protocol_trusted = ["127.0.0.0/8"]\npeek_timeout = "300ms"'


async def test_proxy_header_names_the_real_client(rigs: Callable[..., Rig]) -> None:
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            config = make_config([f"127.0.0.1:{backend.port}"], listener=TRUSTED)
            rig = rigs(config, router=Router())
            client = await rig.serve(nursery)
            await client.send_all(b"PROXY TCP4 198.18.0.10 198.18.1.1 40000 443\r\npayload")
            await client.send_eof()
            assert await read_to_eof(client) == b""
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert backend.received == [b"payload"]  # the header is consumed
    flow = rig.recorder.the_flow()
    assert (flow.client, flow.destination) == (("198.18.0.10", 40000), ("198.18.1.1", 443))
    assert flow.bytes_from_client == len(b"payload")


@pytest.mark.parametrize(
    ("sent", "eof", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "bad PROXY header: "),
        (b"PROXY TCP4 198.18.0.10", False, "bad PROXY header: preamble not complete within 0.3s"),
        (b"PROXY TCP4 198.18.0.10", True, "bad PROXY header: peer closed"),
    ],
    ids=["garbage", "stalled", "eof"],
)
async def test_bad_proxy_header(
    rigs: Callable[..., Rig], sent: bytes, eof: bool, error: str
) -> None:
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            config = make_config([f"127.0.0.1:{backend.port}"], listener=TRUSTED)
            rig = rigs(config, router=Router())
            client = await rig.serve(nursery)
            await client.send_all(sent)
            if eof:
                await client.send_eof()
            await ended(client)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.BAD_PROXY_HEADER
    assert flow.error is not None and flow.error.startswith(error), flow.error
    assert rig.recorder.opened == []  # the opened hook sees only the real client
    assert backend.received == []


async def test_proxy_header_from_an_untrusted_source(rigs: Callable[..., Rig]) -> None:
    backend = Backend()
    listener = 'proxy_protocol = true\nproxy_protocol_trusted = ["198.18.0.0/15"]'
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"], listener=listener), r=Router())
            client = await rig.serve(nursery)
            await client.send_all(b"PROXY TCP4 198.18.0.10 198.18.1.1 40000 443\r\n")
            await ended(client)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.BAD_PROXY_HEADER
    assert flow.error == "PROXY header expected from an untrusted source 127.0.0.1"
    assert flow.client[0] == "127.0.0.1"
    assert backend.received == []


# --- ended from outside ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("draining", "reason"),
    [(True, CloseReason.DRAIN), (False, CloseReason.INTERNAL_ERROR)],
)
async def test_cancelled_mid_relay(rigs: Callable[..., Rig], draining: bool, reason: str) -> None:
    """Only the drain cancels connections: anything else is an internal error."""
    backend = Backend()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            rig = rigs(make_config([f"127.0.0.1:{backend.port}"]), router=Router())
            client = await rig.serve(nursery)
            await client.send_all(b"half")
            while not backend.received or not backend.received[-1]:
                await trio.sleep(0.01)
            assert len(rig.rt.flows) == 1
            rig.draining = draining
            nursery.cancel_scope.cancel()
    flow = rig.recorder.the_flow()
    assert flow.close_reason == reason
    assert flow.bytes_from_client == 4
    assert rig.rt.flows == {}


async def test_refused_over_capacity_is_reset_and_recorded(rigs: Callable[..., Rig]) -> None:
    rig = rigs(make_config(["127.0.0.1:9"], listener="max_connections = 7"), router=Router())
    with trio.fail_after(10):
        client, sock, peer = await rig.connect()
        refuse_over_capacity(rig.rt, rig.lc, sock, peer)
        await expect_reset(client)
    assert sock.fileno() == -1
    flow = rig.recorder.the_flow()
    assert flow.close_reason == CloseReason.OVER_CAPACITY
    assert flow.error == "listener at max_connections = 7"
    assert flow.client == client.socket.getsockname()
    assert flow.destination == rig.lsn.getsockname()
    assert rig.recorder.opened == []


@pytest.mark.parametrize(
    ("sni", "alpn", "no_hello", "routes", "why"),
    [
        (
            "a.test",
            ("h2", "http/1.1"),
            None,
            "sni+alpn",
            'no route for SNI "a.test", ALPN h2,http/1.1',
        ),
        ("a.test", (), None, "sni+alpn", 'no route for SNI "a.test", no ALPN'),
        ("a.test", ("h2",), None, "sni", 'no route for SNI "a.test"'),
        (None, ("h2",), None, "sni", "no SNI: the ClientHello has no server_name"),
        (None, (), "not TLS", "sni+alpn", "no SNI: not TLS"),
        ("a.test", ("http/1.1",), None, "alpn", "no route for ALPN http/1.1"),
        ("a.test", (), None, "alpn", "no ALPN: the ClientHello offers none"),
        (None, (), "not TLS", "alpn", "no ALPN: not TLS"),
        (None, ("x" * 200,) * 300, None, "alpn", "no route for ALPN " + "x" * 61 + "..."),
    ],
)
def test_no_route_reason_names_what_the_client_offered(sni, alpn, no_hello, routes, why):
    flow = Flow(1, "tls", "tcp", ("127.0.0.1", 1), ("127.0.0.1", 2))
    flow.sni, flow.alpn = sni, alpn
    assert no_route_reason(flow, no_hello, "sni" in routes, "alpn" in routes) == why
