"""Byte-exact relay through a real ``l4gw run``: sizes, half-close, concurrency."""

from __future__ import annotations

import pytest
import trio

from backends import (
    AFTER_EOF,
    CONCURRENT,
    FIRST,
    ScriptedBackend,
    check_exchange,
    scripted_exchange,
)
from gwproc import free_port

KiB, MiB = 1024, 1024 * 1024


def config(port: int, backend_port: int, extra: str = "") -> str:
    return f"""
[gateway]
drain_timeout = "2s"
{extra}

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{backend_port}"]
connect_timeout = "2s"
idle_timeout = "30s"
"""


@pytest.fixture
async def path(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gateway(config(port, bport))
    return backend, port


@pytest.mark.parametrize("send,reply", [(0, 0), (1, 0), (0, 1), (1, 1), (64 * KiB, 0),
                                        (0, 64 * KiB), (64 * KiB, 64 * KiB), (64 * MiB, 0),
                                        (0, 64 * MiB)])
async def test_sizes_each_direction(path, send, reply):
    backend, port = path
    sent, got = await scripted_exchange("127.0.0.1", port, send, reply, seed=7)
    await check_exchange(backend, 7, sent, got, reply)


async def test_big_both_ways_at_once(path):
    backend, port = path
    sent, got = await scripted_exchange("127.0.0.1", port, 64 * MiB, 64 * MiB, seed=9)
    await check_exchange(backend, 9, sent, got, 64 * MiB)


async def test_client_half_close_still_receives_reply(path):
    """The client sends, shuts its write side, then receives the whole reply."""
    backend, port = path
    sent, got = await scripted_exchange("127.0.0.1", port, 3 * MiB, 5 * MiB, seed=11,
                                        mode=AFTER_EOF)
    await check_exchange(backend, 11, sent, got, 5 * MiB)


async def test_backend_half_close_client_still_sends(path):
    """The backend replies and half-closes first; the client sends afterwards."""
    backend, port = path
    sent, got = await scripted_exchange("127.0.0.1", port, 5 * MiB, 3 * MiB, seed=13,
                                        mode=FIRST)
    await check_exchange(backend, 13, sent, got, 3 * MiB)


async def test_500_concurrent_connections_intact(path):
    backend, port = path
    results = {}

    async def one(seed: int) -> None:
        send = (seed * 7919) % (256 * KiB)
        reply = (seed * 104729) % (256 * KiB)
        mode = (CONCURRENT, AFTER_EOF, FIRST)[seed % 3]
        results[seed] = (reply, await scripted_exchange("127.0.0.1", port, send, reply, seed, mode))

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for seed in range(1000, 1500):
                n.start_soon(one, seed)
    assert len(results) == 500
    for seed, (reply, (sent, got)) in results.items():
        await check_exchange(backend, seed, sent, got, reply)
