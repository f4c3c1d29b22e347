"""Faults on the backend side: refusals, mid-stream closes, idle and connect timeouts."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from backends import ScriptedBackend, check_exchange, recv_all, scripted_exchange
from gwproc import free_port


def config(port: int, endpoints: list[str], cluster: str = "", gateway: str = "") -> str:
    eps = ", ".join(f'"{e}"' for e in endpoints)
    return f"""
[gateway]
drain_timeout = "1s"
{gateway}

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = [{eps}]
connect_timeout = "500ms"
{cluster}
"""


def closed_port() -> int:
    """A loopback port with nothing listening: connects are refused at once."""
    return free_port()


async def test_first_endpoint_refuses_next_serves(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(config(port, [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{bport}"]))
    for seed in range(4):  # round robin starts at each endpoint in turn
        sent, got = await scripted_exchange("127.0.0.1", port, 1000, 2000, seed)
        await check_exchange(backend, seed, sent, got, 2000)
    assert backend.connections == 4
    assert "connect_failed" not in gw.log


async def test_all_refuse_client_closed_promptly_and_logged(gateway):
    port = free_port()
    gw = gateway(config(port, [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"hello")
            # Unread bytes make the close a reset; either way it is prompt.
            try:
                assert await recv_all(stream) == b""
            except trio.BrokenResourceError:
                pass
    text = gw.wait_log(r"connect_failed")
    assert "Connection refused" in text


async def test_backend_closes_mid_stream_client_sees_close(nursery, gateway):
    async def half_then_reset(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x" * 100_000)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    bport = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, half_then_reset, listeners)
    port = free_port()
    gw = gateway(config(port, [f"127.0.0.1:{bport}"], gateway="log_connections = true"))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        got = 0
        with pytest.raises(trio.BrokenResourceError):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += len(chunk)
                await trio.sleep(0.01)
            # A reset must reach the client as a reset, not as a clean EOF.
            raise AssertionError(f"clean EOF after {got} bytes")
        await stream.aclose()
    gw.wait_log(r"backend_reset")


async def test_backend_clean_close_mid_stream(nursery, gateway):
    async def send_and_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"y" * 50_000)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, send_and_close, listeners)
    port = free_port()
    gateway(config(port, [f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"]))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            assert len(await recv_all(stream)) == 50_000


async def test_idle_timeout_closes_idle_pair(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(
        config(
            port,
            [f"127.0.0.1:{bport}"],
            cluster='idle_timeout = "300ms"',
            gateway="log_connections = true",
        )
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        start = trio.current_time()
        async with stream:
            assert await recv_all(stream) == b""
        assert trio.current_time() - start >= 0.25
    gw.wait_log(r"idle_timeout")


@pytest.fixture
def silent_endpoint():
    """An endpoint that never answers SYN: a listener whose accept queue is full.

    Linux drops a SYN when the listener's accept queue is full
    (tcp_conn_request: sk_acceptq_is_full), so connects to it hang.
    """
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(TimeoutError):
        probe.connect(("127.0.0.1", port))
    probe.close()
    yield port
    for s in fillers:
        s.close()
    lsock.close()


async def test_connect_timeout_honoured(gateway, silent_endpoint):
    port = free_port()
    gw = gateway(config(port, [f"127.0.0.1:{silent_endpoint}"], cluster="connect_attempts = 1"))
    with trio.fail_after(5):
        start = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            assert await recv_all(stream) == b""
        elapsed = trio.current_time() - start
    assert elapsed >= 0.45, elapsed
    text = gw.wait_log(r"connect_failed")
    assert "timed out after 0.5s" in text


async def test_connect_budget_stops_retries(gateway, silent_endpoint):
    port = free_port()
    gw = gateway(
        config(
            port,
            [f"127.0.0.1:{silent_endpoint}"] * 3,
            cluster='connect_attempts = 3\nconnect_budget = "700ms"',
        )
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            assert await recv_all(stream) == b""
    assert "budget 0.7s spent" in gw.wait_log(r"connect_failed")
