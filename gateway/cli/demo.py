"""``l4gw demo``: the gateway in front of two tiny HTTP backends, all on loopback.

The configuration is embedded (below) so that a newcomer sees the gateway
work with one command; every connection is logged, and ``curl`` shows which
backend answered.
"""

from __future__ import annotations

import socket
import tomllib
from typing import Any

import trio

DEMO_CONFIG = """
# The embedded demo configuration: one listener, one route, two backends.
[gateway]
drain_timeout = "2s"
log_connections = true

[[listener]]
name = "demo"
bind = "127.0.0.1:{port}"

[[route]]
listener = "demo"
cluster = "hello"

[cluster.hello]
endpoints = ["127.0.0.1:{b1}", "127.0.0.1:{b2}"]
balance = "round_robin"
connect_timeout = "1s"
idle_timeout = "30s"

[telemetry]
exporter = "{exporter}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_config(port: int, b1: int, b2: int, exporter: str = "none") -> dict[str, Any]:
    return tomllib.loads(DEMO_CONFIG.format(port=port, b1=b1, b2=b2, exporter=exporter))


async def http_backend(
    name: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A minimal HTTP/1.1 server answering every request with its own name."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            body = f"hello from {name} (127.0.0.1:{port})\n".encode()
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            try:
                await stream.send_all(head + body)
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(serve, listeners)
