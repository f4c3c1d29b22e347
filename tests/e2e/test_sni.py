"""SNI routing with real TLS clients (Python ssl) through the gateway to TLS backends."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
import trustme

from gwproc import free_port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def tls_backend(ca: trustme.CA, name: str, *, task_status: Any) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.example.com", "*.example.org", "plain.test").configure_cert(ctx)

    async def serve(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, ctx, server_side=True)
        try:
            await tls.do_handshake()
            await tls.receive_some(100)
            await tls.send_all(name.encode())
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


async def tls_get(ca: trustme.CA, port: int, sni: str, pieces: int = 1) -> str:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
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
