"""SNI and ALPN routing with real TLS clients (Python ssl) through the gateway to TLS backends."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
import trustme

from gwproc import GatewayProcess, free_port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def tls_backend(ca: trustme.CA, name: str, alpn: bool = False, *, task_status: Any) -> None:
    """Replies ``name`` (with ``alpn``: and the protocol it negotiated, as "A h2")."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.example.com", "*.example.org", "plain.test").configure_cert(ctx)
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            await tls.receive_some(100)
            reply = f"{name} {tls.selected_alpn_protocol()}" if alpn else name
            await tls.send_all(reply.encode())
            await tls.aclose()
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


class SplitFirstWrite(trio.abc.Stream):
    """Sends the first write (the ClientHello) as several TCP segments, spaced out."""

    def __init__(self, inner: trio.SocketStream, pieces: int) -> None:
        self.inner, self.pieces, self.first = inner, pieces, True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.first:
            self.first = False
            step = max(1, len(data) // self.pieces)
            for i in range(0, len(data), step):
                await self.inner.send_all(data[i : i + step])
                await trio.sleep(min(0.05, 0.5 / self.pieces))  # within peek_timeout
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def tls_get(
    ca: trustme.CA, port: int, sni: str, pieces: int = 1, alpn: list[str] | None = None
) -> str:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = SplitFirstWrite(tcp, pieces) if pieces > 1 else tcp
    tls = trio.SSLStream(stream, ctx, server_hostname=sni)
    await tls.do_handshake()
    await tls.send_all(b"hi")
    reply = await tls.receive_some(100)
    await tls.aclose()
    return reply.decode()


@pytest.fixture
async def sni_gateway(nursery, gateway, ca):
    a = await nursery.start(tls_backend, ca, "A")
    b = await nursery.start(tls_backend, ca, "B")
    c = await nursery.start(tls_backend, ca, "C")
    port = free_port()
    gateway(f"""
[gateway]
log_connections = true

[[listener]]
name = "tls"
bind = "127.0.0.1:{port}"

[[route]]
listener = "tls"
sni = ["api.example.com"]
cluster = "a"

[[route]]
listener = "tls"
sni = ["*.example.org"]
cluster = "b"

[[route]]
listener = "tls"
cluster = "fallback"

[cluster.a]
endpoints = ["127.0.0.1:{a}"]
[cluster.b]
endpoints = ["127.0.0.1:{b}"]
[cluster.fallback]
endpoints = ["127.0.0.1:{c}"]
""")
    return port


async def test_sni_routes_to_two_clusters(sni_gateway, ca):
    with trio.fail_after(10):
        assert await tls_get(ca, sni_gateway, "api.example.com") == "A"
        assert await tls_get(ca, sni_gateway, "deep.example.org") == "B"
        assert await tls_get(ca, sni_gateway, "plain.test") == "C"


@pytest.mark.parametrize("pieces", [2, 5, 40])
async def test_client_hello_split_across_segments_still_routes(sni_gateway, ca, pieces):
    with trio.fail_after(15):
        assert await tls_get(ca, sni_gateway, "api.example.com", pieces) == "A"
        assert await tls_get(ca, sni_gateway, "a.example.org", pieces) == "B"


@pytest.fixture
async def alpn_gateway(nursery, gateway, ca) -> tuple[GatewayProcess, int, int]:
    a = await nursery.start(tls_backend, ca, "A", True)
    b = await nursery.start(tls_backend, ca, "B", True)
    c = await nursery.start(tls_backend, ca, "C", True)
    port, strict = free_port(), free_port()
    gw = gateway(f"""
[gateway]
log_connections = true

[[listener]]
name = "tls"
bind = "127.0.0.1:{port}"

[[listener]]
name = "strict"
bind = "127.0.0.1:{strict}"

[[route]]
listener = "tls"
alpn = ["h2"]
cluster = "a"

[[route]]
listener = "tls"
alpn = ["http/1.1"]
cluster = "b"

[[route]]
listener = "tls"
cluster = "fallback"

[[route]]
listener = "strict"
sni = ["api.example.com"]
alpn = ["h2"]
cluster = "a"

[cluster.a]
endpoints = ["127.0.0.1:{a}"]
[cluster.b]
endpoints = ["127.0.0.1:{b}"]
[cluster.fallback]
endpoints = ["127.0.0.1:{c}"]
""")
    return gw, port, strict


async def test_alpn_routes_to_two_clusters(alpn_gateway, ca):
    _, port, _ = alpn_gateway
    with trio.fail_after(10):
        # The ClientHello reaches the backend untouched: it negotiates what was offered.
        assert await tls_get(ca, port, "api.example.com", alpn=["h2"]) == "A h2"
        assert await tls_get(ca, port, "api.example.com", alpn=["http/1.1"]) == "B http/1.1"
        assert await tls_get(ca, port, "api.example.com", alpn=["h2", "http/1.1"]) == "A h2"
        assert await tls_get(ca, port, "plain.test", alpn=["http/1.1"], pieces=5) == "B http/1.1"
        assert await tls_get(ca, port, "api.example.com") == "C None"  # no ALPN: the fallback


async def tls_refused(ca: trustme.CA, port: int, sni: str, alpn: list[str]) -> None:
    """A TLS handshake the gateway closes before any backend answers."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=sni)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await tls.do_handshake()
    await tcp.aclose()


async def test_no_alpn_route_is_refused_with_what_was_offered(alpn_gateway, ca):
    gw, _, strict = alpn_gateway
    with trio.fail_after(20):
        assert await tls_get(ca, strict, "api.example.com", alpn=["h2"]) == "A h2"
        await tls_refused(ca, strict, "api.example.com", ["http/1.1", "spdy/3"])
        await tls_refused(ca, strict, "api.example.com", [])
        log = await gw.await_log(r"no_route", count=2)
    refusals = [line for line in log.splitlines() if "no_route" in line]
    assert any('no route for SNI "api.example.com", ALPN http/1.1,spdy/3' in r for r in refusals), (
        log
    )
    assert any('no route for SNI "api.example.com", no ALPN' in r for r in refusals), log
