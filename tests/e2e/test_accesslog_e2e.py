"""The access log of a real ``l4gw run``: exact byte counts, refusals, SIGUSR1 reopen."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from backends import HEADER, ScriptedBackend, check_exchange, recv_all, scripted_exchange
from gwproc import free_port


def config(port: int, port6: int, backend: int, log_path: Path) -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[listener]]
name = "public6"
bind = "[::1]:{port6}"

[[route]]
name = "main"
listener = "public"
cluster = "api"

[[route]]
name = "main6"
listener = "public6"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{backend}"]

# 127.0.0.1 makes three connections in this test: a fourth is refused.
[plugin.ratelimit]
per_client = {{ rate = 1, per = "1h", burst = 3 }}

[plugin.accesslog]
path = "{log_path}"
"""


def lines(path: Path, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Wait until ``path`` has ``count`` lines; return them parsed."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= count:
            return [json.loads(line) for line in text.splitlines()]
        assert time.monotonic() < deadline, f"{path}: {text.count(chr(10))} of {count} lines"
        time.sleep(0.02)


async def exchange_from(port: int, source: str, seed: int) -> bytes:
    """An empty scripted exchange from ``source``: b"" back whether admitted or not."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    with trio.fail_after(5):
        try:
            await sock.connect(("127.0.0.1", port))
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(HEADER.pack(0, seed, 0))
                await stream.send_eof()
                return await recv_all(stream)
        except (OSError, trio.BrokenResourceError):
            return b""
        finally:
            sock.close()


@pytest.mark.timeout(60)
async def test_lines_carry_exact_bytes_refusals_and_survive_rotation(nursery, gateway, tmp_path):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port, port6 = free_port(), free_port("::1")
    log_path = tmp_path / "access.log"
    gw = gateway(config(port, port6, bport, log_path))

    send, reply = 100_000, 250_000
    sent, got = await scripted_exchange("127.0.0.1", port, send, reply, seed=3)
    await check_exchange(backend, 3, sent, got, reply)
    [first] = lines(log_path, 1)
    assert first["bytes_from_client"] == HEADER.size + send
    assert first["bytes_to_client"] == reply
    assert first["route"] == "main" and first["cluster"] == "api"
    assert first["endpoint"] == f"127.0.0.1:{bport}"
    assert first["listener"] == "public" and first["transport"] == "tcp"
    assert first["client"].startswith("127.0.0.1:")
    assert first["destination"] == f"127.0.0.1:{port}"
    assert first["close_reason"] in ("client_eof", "backend_eof")
    assert isinstance(first["spliced"], bool) and first["tier"] in ("copy", "splice", "sockmap")
    assert first["refused_by"] is None and first["refused_rule"] is None
    assert first["duration_ms"] > 0
    assert first["trace_id"] is None or len(first["trace_id"]) == 32
    assert first["time"].endswith("Z") and "T" in first["time"]

    # IPv6 clients are bracketed.
    sent, got = await scripted_exchange("::1", port6, 10, 20, seed=4)
    await check_exchange(backend, 4, sent, got, 20)
    v6 = lines(log_path, 2)[1]
    assert v6["client"].startswith("[::1]:") and v6["destination"] == f"[::1]:{port6}"
    assert (v6["bytes_from_client"], v6["bytes_to_client"]) == (HEADER.size + 10, 20)

    # A refusal names the plugin and the rule.
    for seed in range(6, 10):
        await exchange_from(port, "127.0.0.9", seed)
    admitted, refused = lines(log_path, 6)[4:6]
    assert admitted["refused_by"] is None and admitted["close_reason"] != "refused"
    assert refused["client"].startswith("127.0.0.9:")
    assert (refused["refused_by"], refused["refused_rule"]) == ("ratelimit", "per_client")
    assert refused["close_reason"] == "refused" and refused["endpoint"] is None
    assert refused["bytes_from_client"] == 0 == refused["bytes_to_client"]

    # Rotation: rename, SIGUSR1, and the next line goes to a new file.
    rotated = tmp_path / "access.log.1"
    os.rename(log_path, rotated)
    gw.signal(signal.SIGUSR1)
    gw.wait_log(r"accesslog: reopening")
    sent, got = await scripted_exchange("127.0.0.1", port, 1, 1, seed=5)
    await check_exchange(backend, 5, sent, got, 1)
    [after] = lines(log_path, 1)
    assert (after["bytes_from_client"], after["bytes_to_client"]) == (HEADER.size + 1, 1)
    assert len(lines(rotated, 6)) == 6
    assert all(isinstance(json.loads(x), dict) for x in rotated.read_text().splitlines())
