"""``endpoints_file`` with a real ``l4gw run``: the file replaced atomically moves new
connections while one opened before keeps flowing byte-exact to the old backend; a
broken file keeps the last good set with one error line; ``/status`` shows origins.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from adminhttp import get_json
from backends import recv_exactly, tagged_echo_server
from gwproc import GatewayProcess, free_port
from relay_helpers import payload

pytestmark = pytest.mark.timeout(60)


def write_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(tmp, path)


async def reach(port: int) -> tuple[trio.SocketStream, bytes]:
    """A new connection through the gateway, and the tag of the backend it reached."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return stream, await recv_exactly(stream, 1)


async def echo(stream: trio.SocketStream, data: bytes) -> bytes:
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(data):
            chunk = await stream.receive_some(65536)
            assert chunk, "closed early"
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await stream.send_all(data)
    return bytes(got)


async def test_file_replaced_atomically_moves_new_connections_only(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    path = tmp_path / "api-endpoints.json"
    async with trio.open_nursery() as nursery:
        a = await nursery.start(tagged_echo_server, b"A")
        b = await nursery.start(tagged_echo_server, b"B")
        write_atomic(path, [f"127.0.0.1:{a}"])
        config = f"""
[gateway]
drain_timeout = "2s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints_file = "{path.name}"

[admin]
bind = "127.0.0.1:{admin}"
"""
        gw = GatewayProcess(tmp_path, config)
        try:
            gw.start(wait_ready=False)
            await gw.await_log(r"ready: ", 15)
            old, tag = await reach(port)
            assert tag == b"A"
            data = payload(1 << 20, seed=41)
            first = await echo(old, data[: 1 << 19])

            # A leaves the set entirely.
            write_atomic(path, [{"address": f"127.0.0.1:{b}", "weight": 2}])
            log = await gw.await_log(rf"discovery: cluster api: .* removed 127\.0\.0\.1:{a}", 10)
            assert (
                f"discovery: cluster api: 1 endpoints, added 127.0.0.1:{b} weight=2, "
                f"removed 127.0.0.1:{a}" in log
            )
            for _ in range(3):
                new, tag = await reach(port)
                assert tag == b"B"
                assert await echo(new, b"hello") == b"hello"
                await new.aclose()
            # The connection opened before the change still flows to A, byte-exact.
            second = await echo(old, data[1 << 19 :])
            assert first + second == data
            await old.aclose()

            # A broken file: the last good set stays, one error line for this version.
            write_atomic(path, f'["127.0.0.1:{a}", {{"address": "127.0.0.1:0"}}]')
            await gw.await_log(r"discovery: .*api-endpoints.json: \[1\]\.address: port 0", 10)
            await trio.sleep(2.2)  # two more polls of the same bad version
            errors = re.findall(r"ERROR.*api-endpoints.json.*keeping the last good", gw.log)
            assert len(errors) == 1, gw.log
            new, tag = await reach(port)
            assert tag == b"B"
            await new.aclose()

            # A reload keeps the file's last good set: no empty window, no change line.
            changes = len(re.findall(r"discovery: cluster api:", gw.log))
            gw.write_config(
                config.replace("[cluster.api]", '[cluster.api]\nconnect_timeout = "3s"')
            )
            assert await trio.to_thread.run_sync(gw.reload)
            new, tag = await reach(port)
            assert tag == b"B"
            await new.aclose()
            assert len(re.findall(r"discovery: cluster api:", gw.log)) == changes

            document = await trio.to_thread.run_sync(get_json, admin, "/status")
            rows = document["endpoints"]["api"]["endpoints"]
            assert [(r["origin"], r["source"], r["address"], r["weight"]) for r in rows] == [
                ("file", str(path), f"127.0.0.1:{b}", 2)
            ]
            assert all(r["health"] == "unchecked" and r["updated"] for r in rows)
        finally:
            await trio.to_thread.run_sync(gw.stop)
            nursery.cancel_scope.cancel()


async def test_a_missing_file_starts_empty_and_refuses_no_endpoint(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "later.json"
    config = f"""
[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints_file = "{path}"
"""
    async with trio.open_nursery() as nursery:
        a = await nursery.start(tagged_echo_server, b"A")
        gw = GatewayProcess(tmp_path, config)
        try:
            gw.start(wait_ready=False)
            await gw.await_log(r"ready: ", 15)
            assert "no endpoints from it until it appears" in gw.log
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""
            await stream.aclose()
            await gw.await_log(r"no_endpoint error='cluster api has no endpoints'", 5)
            write_atomic(path, [f"127.0.0.1:{a}"])
            await gw.await_log(r"discovery: cluster api: 1 endpoints", 10)
            stream, tag = await reach(port)
            assert tag == b"A"
            await stream.aclose()
        finally:
            await trio.to_thread.run_sync(gw.stop)
            nursery.cancel_scope.cancel()
