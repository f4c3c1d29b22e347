"""A discovery plugin installed by entry point publishes a cluster's endpoints through
``gateway.discovery``, with a real ``l4gw run``: connections follow the set it
publishes, ``/status`` shows the origin, ``l4gw check`` refuses an unknown plugin."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from adminhttp import get_json
from backends import recv_exactly, tagged_echo_server
from entrypoints import plugin_env
from gwproc import GatewayProcess, free_port, l4gw

pytestmark = pytest.mark.timeout(60)


def config(port: int, admin: int, control: Path, plugin: str = "publisher") -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
discovery = "{plugin}"

[plugin.publisher]
cluster = "api"
control = "{control}"

[admin]
bind = "127.0.0.1:{admin}"
"""


def publish(control: Path, *ports: int) -> None:
    tmp = control.with_name(control.name + ".tmp")
    tmp.write_text(json.dumps([f"127.0.0.1:{p}" for p in ports]))
    os.replace(tmp, control)


async def tag_of(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        return await recv_exactly(stream, 1)


async def test_plugin_published_sets_are_followed(tmp_path: Path) -> None:
    env = plugin_env(tmp_path, "publisher", "l4gw_test_publisher")
    port, admin = free_port(), free_port()
    control = tmp_path / "set.json"

    checked = l4gw(
        "check", "-c", str(_write(tmp_path, config(port, admin, control, "nope"))), env=env
    )
    assert checked.returncode != 0
    assert 'cluster.api.discovery: no loaded plugin is named "nope"' in checked.stderr

    async with trio.open_nursery() as nursery:
        a = await nursery.start(tagged_echo_server, b"A")
        b = await nursery.start(tagged_echo_server, b"B")
        publish(control, a)
        gw = GatewayProcess(tmp_path, config(port, admin, control), env=env)
        try:
            gw.start(wait_ready=False)
            await gw.await_log(r"ready: ", 15)
            await gw.await_log(r"discovery: cluster api: 1 endpoints, added 127\.0\.0\.1", 10)
            assert await tag_of(port) == b"A"
            publish(control, b)
            await gw.await_log(
                rf"discovery: cluster api: 1 endpoints, added 127\.0\.0\.1:{b}, "
                rf"removed 127\.0\.0\.1:{a}",
                10,
            )
            assert {await tag_of(port) for _ in range(3)} == {b"B"}
            rows = (await trio.to_thread.run_sync(get_json, admin, "/status"))["endpoints"]["api"][
                "endpoints"
            ]
            assert [(r["origin"], r["source"], r["address"]) for r in rows] == [
                ("plugin", "publisher", f"127.0.0.1:{b}")
            ]
        finally:
            await trio.to_thread.run_sync(gw.stop)
            nursery.cancel_scope.cancel()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "check.toml"
    path.write_text(text)
    return path
