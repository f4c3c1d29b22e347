"""Hooks a plugin declares idle in ``l4gw_configure``: not called, and a connection
keeps, to its close, the hooks of the configuration it started under.

A real ``l4gw run`` with the test plugin ``pairs`` (tests/testplugins/l4gw_test_pairs.py,
installed through an entry point): its opened and closed hooks are idle unless
``[plugin.pairs] watch = true``; ``/status`` shows what it saw, and which hooks the
gateway leaves out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from adminhttp import aget
from backends import echo_server
from entrypoints import plugin_env
from gwproc import free_port


def config(port: int, admin: int, backend: int, watch: bool) -> str:
    return f"""
[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"

[plugin.pairs]
watch = {"true" if watch else "false"}
"""


async def open_echo(port: int, n: int) -> trio.SocketStream:
    """A connection through the gateway that has carried one exchange (so it is open)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    payload = f"connection {n}\n".encode()
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        got += await stream.receive_some(100)
    assert got == payload
    return stream


async def counts(admin: int, **expected: int) -> dict[str, Any]:
    """``/status`` once the plugin's counts are ``expected`` (closes land after the client's)."""
    with trio.fail_after(5):
        while True:
            code, body = await aget(admin, "/status")
            assert code == 200, body
            status: dict[str, Any] = json.loads(body)
            if status["pairs"] == {"opened": 0, "closed": 0, "unpaired": 0} | expected:
                return status
            await trio.sleep(0.02)


async def test_a_connection_keeps_the_hooks_it_started_with(
    nursery: trio.Nursery, gateway, tmp_path: Path
) -> None:
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    env = plugin_env(tmp_path, "pairs", "l4gw_test_pairs")
    gw = gateway(config(port, admin, backend, watch=False), env=env)

    # Idle: not called, and /status says which hooks are left out.
    a = await open_echo(port, 1)
    status = await counts(admin)
    assert status["idle_hooks"]["pairs"] == ["l4gw_connection_closed", "l4gw_connection_opened"]
    # Round robin (the default balancer) reads no active counts: routing keeps none.
    assert status["idle_hooks"]["routing"] == ["l4gw_connect_attempt", "l4gw_connection_closed"]

    # Watching after a reload: the connections that start now are seen open and
    # closed; the one opened before is not seen closing (its close is no half pair).
    gw.write_config(config(port, admin, backend, watch=True))
    assert gw.reload()
    b = await open_echo(port, 2)
    status = await counts(admin, opened=1)
    assert "pairs" not in status["idle_hooks"]
    await a.aclose()
    await b.aclose()
    await counts(admin, opened=1, closed=1)

    # Idle again: a connection opened while watching is still seen closing.
    c = await open_echo(port, 3)
    await counts(admin, opened=2, closed=1)
    gw.write_config(config(port, admin, backend, watch=False))
    assert gw.reload()
    d = await open_echo(port, 4)
    await c.aclose()
    await d.aclose()
    await counts(admin, opened=2, closed=2)
