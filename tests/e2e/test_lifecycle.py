"""Reload (SIGHUP) and drain (SIGTERM) with real signals to a real process."""

from __future__ import annotations

import re
import signal

import trio

from backends import (
    AFTER_EOF,
    HEADER,
    ScriptedBackend,
    check_exchange,
    digest,
    recv_all,
    scripted_exchange,
)
from gwproc import free_port, refused
from relay_helpers import payload


def config(listeners: dict[str, int], cluster_port: int, drain: str = "5s") -> str:
    text = f'[gateway]\ndrain_timeout = "{drain}"\nlog_connections = true\n'
    for name, port in listeners.items():
        text += f'''
[[listener]]
name = "{name}"
bind = "127.0.0.1:{port}"

[[route]]
listener = "{name}"
cluster = "api"
'''
    return text + f'\n[cluster.api]\nendpoints = ["127.0.0.1:{cluster_port}"]\n'


class OpenExchange:
    """A scripted exchange held open: part of the payload sent, the rest later."""

    def __init__(self, stream: trio.SocketStream, seed: int, size: int, reply: int) -> None:
        self.stream, self.seed, self.data, self.reply = stream, seed, payload(size, seed), reply

    @classmethod
    async def open(cls, port: int, seed: int, size: int = 200_000, reply: int = 300_000):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ex = cls(stream, seed, size, reply)
        await stream.send_all(HEADER.pack(reply, seed, AFTER_EOF) + ex.data[: size // 2])
        return ex

    async def finish(self, backend: ScriptedBackend) -> None:
        async with self.stream:
            await self.stream.send_all(self.data[len(self.data) // 2 :])
            await self.stream.send_eof()
            got = await recv_all(self.stream)
        await check_exchange(backend, self.seed, digest(self.data), got, self.reply)


async def test_reload_valid_file(nursery, gateway):
    b1, b2 = ScriptedBackend("b1"), ScriptedBackend("b2")
    p1, p2 = await nursery.start(b1.run), await nursery.start(b2.run)
    a, b = free_port(), free_port()
    gw = gateway(config({"a": a}, p1))
    with trio.fail_after(20):
        held = await OpenExchange.open(a, seed=1)
        await trio.to_thread.run_sync(gw.write_config, config({"b": b}, p2))
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(gw.wait_log, "reloaded")
        # Listener "a" was removed, "b" added; new connections use the new cluster.
        assert await refused(a), gw.log
        sent, got = await scripted_exchange("127.0.0.1", b, 1000, 1000, seed=2)
        await check_exchange(b2, 2, sent, got, 1000)
        # The connection opened under the old config keeps its backend.
        await held.finish(b1)
        assert b1.connections == 1 and b2.connections == 1


async def test_reload_keeps_unchanged_listener_open(nursery, gateway):
    b1, b2 = ScriptedBackend("b1"), ScriptedBackend("b2")
    p1, p2 = await nursery.start(b1.run), await nursery.start(b2.run)
    a = free_port()
    gw = gateway(config({"a": a}, p1))
    with trio.fail_after(20):
        gw.write_config(config({"a": a}, p2))
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(gw.wait_log, "reloaded")
        sent, got = await scripted_exchange("127.0.0.1", a, 10, 10, seed=3)
        await check_exchange(b2, 3, sent, got, 10)
    assert "listener a closed" not in gw.log


async def test_reload_invalid_file_keeps_running_config(nursery, gateway):
    b1 = ScriptedBackend()
    p1 = await nursery.start(b1.run)
    a = free_port()
    gw = gateway(config({"a": a}, p1))
    with trio.fail_after(20):
        held = await OpenExchange.open(a, seed=4)
        gw.write_config(config({"a": a}, p1) + '\n[cluster.bad]\nendpoints = ["127.0.0.1"]\n')
        gw.signal(signal.SIGHUP)
        text = await trio.to_thread.run_sync(gw.wait_log, "reload failed")
        assert 'cluster.bad.endpoints[0]: not an address: "127.0.0.1"' in text
        sent, got = await scripted_exchange("127.0.0.1", a, 10, 10, seed=5)
        await check_exchange(b1, 5, sent, got, 10)
        await held.finish(b1)
    assert gw.proc.poll() is None


async def test_sigterm_drains_open_connections(nursery, gateway):
    b1 = ScriptedBackend()
    p1 = await nursery.start(b1.run)
    a = free_port()
    gw = gateway(config({"a": a}, p1, drain="10s"))
    with trio.fail_after(20):
        held = await OpenExchange.open(a, seed=6)
        await trio.to_thread.run_sync(gw.wait_log, "ready")
        gw.signal(signal.SIGTERM)
        await trio.to_thread.run_sync(gw.wait_log, "draining 1 connections")
        assert await refused(a)
        await held.finish(b1)
        assert await trio.to_thread.run_sync(gw.wait, 10) == 0
    assert "stopped" in gw.log


async def test_drain_timeout_cancels_what_is_left(nursery, gateway):
    b1 = ScriptedBackend()
    p1 = await nursery.start(b1.run)
    a = free_port()
    gw = gateway(config({"a": a}, p1, drain="500ms"))
    with trio.fail_after(20):
        held = await OpenExchange.open(a, seed=7)
        gw.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(gw.wait, 10) == 0
        async with held.stream:
            # Closed by the gateway, never answered: EOF or reset.
            try:
                assert await recv_all(held.stream) == b""
            except trio.BrokenResourceError:
                pass
    assert "drain timeout" in gw.log
    assert re.search(r"conn \d+ a .*ms drain$", gw.log, re.M)  # the connection's close reason
