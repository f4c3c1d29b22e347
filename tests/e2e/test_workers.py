"""``[gateway] workers = 2``: two processes share the listener; the supervisor keeps them."""

from __future__ import annotations

import os
import re
import signal

import trio

from backends import ScriptedBackend, check_exchange, scripted_exchange
from gwproc import free_port


def config(port: int, bport: int) -> str:
    return f"""
[gateway]
workers = 2
log_connections = true
drain_timeout = "5s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]
"""


def worker_pids(log: str) -> set[str]:
    return set(re.findall(r"INFO \[(\d+)\] l4gw: ready", log))


async def exchanges(backend: ScriptedBackend, port: int, seeds: range) -> None:
    async def one(seed: int) -> None:
        sent, got = await scripted_exchange("127.0.0.1", port, 20_000, 30_000, seed)
        await check_exchange(backend, seed, sent, got, 30_000)

    async with trio.open_nursery() as n:
        for seed in seeds:
            n.start_soon(one, seed)


async def test_two_workers_share_connections_and_drain(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(config(port, bport), wait_ready=False)
    with trio.fail_after(60):
        text = await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
        pids = worker_pids(text)
        assert len(pids) == 2
        await exchanges(backend, port, range(64))
        served = set(re.findall(r"\[(\d+)\] l4gw.conn: conn ", gw.log))
        # The kernel spreads connections by a hash of their addresses: with 64
        # connections both workers serve some (all in one: p = 2**-63).
        assert served == pids, (served, pids)
        gw.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(gw.wait, 15) == 0
    assert gw.log.count("l4gw: stopped") == 2


async def test_supervisor_restarts_a_dead_worker(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(config(port, bport), wait_ready=False)
    with trio.fail_after(60):
        text = await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
        victim = int(sorted(worker_pids(text))[0])
        os.kill(victim, signal.SIGKILL)
        await trio.to_thread.run_sync(gw.wait_log, r"exited with -9; restarting", 15)
        await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 3)
        await exchanges(backend, port, range(100, 132))
        gw.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(gw.wait, 15) == 0


async def test_workers_die_with_the_supervisor(nursery, gateway):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gw = gateway(config(port, bport), wait_ready=False)
    with trio.fail_after(30):
        text = await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
        pids = [int(p) for p in worker_pids(text)]
        gw.proc.kill()
        gw.proc.wait()
        # PR_SET_PDEATHSIG: no orphan keeps serving the port.
        while any(_alive(pid) for pid in pids):
            await trio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
