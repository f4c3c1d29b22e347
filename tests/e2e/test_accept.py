"""The accept loop: connection caps (wait or refuse) and running out of descriptors."""

from __future__ import annotations

import resource

import trio

from backends import ScriptedBackend, check_exchange, recv_all, scripted_exchange
from gwproc import free_port


def config(port: int, bport: int, listener: str) -> str:
    return f"""
[[listener]]
name = "l"
bind = "127.0.0.1:{port}"
{listener}

[[route]]
listener = "l"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]
"""


async def hold(port: int, n: int) -> list[trio.SocketStream]:
    return [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(n)]


async def test_cap_wait_queues_in_backlog(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gateway(config(port, bport, "max_connections = 2"))
    with trio.fail_after(20):
        held = await hold(port, 2)
        while backend.connections < 2:
            await trio.sleep(0.01)
        # A third connection completes its handshake in the backlog but is not served...
        result: dict[str, object] = {}

        async def third() -> None:
            result["exchange"] = await scripted_exchange("127.0.0.1", port, 10, 10, seed=3)

        nursery.start_soon(third)
        await trio.sleep(0.3)
        assert "exchange" not in result and backend.connections == 2
        # ...until a slot frees.
        await held[0].aclose()
        while "exchange" not in result:
            await trio.sleep(0.01)
        sent, got = result["exchange"]  # type: ignore[misc]
        await check_exchange(backend, 3, sent, got, 10)
        for s in held[1:]:
            await s.aclose()


async def test_cap_refuse_resets_excess(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gateway(config(port, bport, 'max_connections = 1\non_max_connections = "refuse"'))
    with trio.fail_after(20):
        held = await hold(port, 1)
        while backend.connections < 1:
            await trio.sleep(0.01)
        try:
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            async with extra:
                assert await recv_all(extra) == b""
        except (trio.BrokenResourceError, OSError):
            pass  # reset (on loopback it can beat connect() itself): the expected outcome
        assert backend.connections == 1
        await held[0].aclose()
        # Served again once the gateway has seen that close (poll: under load
        # that takes a moment, and until then the cap still refuses).
        seed = 4
        while True:
            try:
                sent, got = await scripted_exchange("127.0.0.1", port, 10, 10, seed)
                await check_exchange(backend, seed, sent, got, 10)
                break
            except Exception:  # reset, refused or short reply (also inside a group)
                seed += 1
                await trio.sleep(0.05)


async def test_accept_survives_emfile(nursery, gateway, tmp_path):
    """With few descriptors, excess connections wait; once freed, the gateway serves again."""
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(config(port, bport, ""), wait_ready=True)
    # Lower the running gateway's descriptor limit (prlimit(2) on its pid).
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    with trio.fail_after(30):
        held = await hold(port, 60)
        await trio.to_thread.run_sync(gw.wait_log, "backing off")
        for s in held:
            await s.aclose()
        # The backlog drains (those clients are gone); then it serves again.
        seed = 100
        while True:
            seed += 1
            try:
                sent, got = await scripted_exchange("127.0.0.1", port, 1, 1, seed)
                await check_exchange(backend, seed, sent, got, 1)
                break
            except Exception:  # reset, refused or short reply (also inside a group)
                await trio.sleep(0.05)
        for seed in range(5):
            sent, got = await scripted_exchange("127.0.0.1", port, 100, 100, seed)
            await check_exchange(backend, seed, sent, got, 100)
    assert gw.proc.poll() is None
