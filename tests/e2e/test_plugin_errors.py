"""A plugin that raises: logged, the configured policy applies, the gateway keeps serving.

The faulty plugin is registered through the ``l4gw.plugins`` entry point of a
distribution found on the gateway's PYTHONPATH, exactly how an installed
third-party plugin is found.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from backends import ScriptedBackend, check_exchange, recv_all, scripted_exchange
from entrypoints import plugin_env
from gwproc import free_port, l4gw


@pytest.fixture
def faulty_env(tmp_path: Path) -> dict[str, str]:
    return plugin_env(tmp_path, "faulty", "l4gw_test_faulty")


def config(ok: int, boom: int, bport: int, fail_in: str, gateway_extra: str = "") -> str:
    return f"""
[gateway]
log_connections = true
{gateway_extra}

[[listener]]
name = "ok"
bind = "127.0.0.1:{ok}"

[[listener]]
name = "boom"
bind = "127.0.0.1:{boom}"

[[route]]
listener = "ok"
cluster = "api"

[[route]]
listener = "boom"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]

[plugin.faulty]
fail_in = "{fail_in}"
"""


async def closed_without_reply(port: int) -> bool:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            return await recv_all(stream) == b""
        except trio.BrokenResourceError:
            return True


@pytest.mark.parametrize("hook", ["admit", "route"])
async def test_raising_plugin_fails_closed_by_default(nursery, gateway, faulty_env, hook):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ok, boom = free_port(), free_port()
    gw = gateway(config(ok, boom, bport, hook), env=faulty_env)
    with trio.fail_after(10):
        assert await closed_without_reply(boom)
        text = await trio.to_thread.run_sync(gw.wait_log, r"plugin_error by=faulty")
        assert f"plugin faulty raised in l4gw_{hook}" in text
        assert backend.connections == 0
        for seed in range(3):  # the gateway keeps serving
            sent, got = await scripted_exchange("127.0.0.1", ok, 100, 100, seed)
            await check_exchange(backend, seed, sent, got, 100)
        assert await closed_without_reply(boom)


@pytest.mark.parametrize("hook", ["admit", "route"])
async def test_raising_plugin_fails_open_when_configured(nursery, gateway, faulty_env, hook):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ok, boom = free_port(), free_port()
    extra = f'{hook}_on_error = "open"'
    gw = gateway(config(ok, boom, bport, hook, extra), env=faulty_env)
    with trio.fail_after(10):
        sent, got = await scripted_exchange("127.0.0.1", boom, 100, 100, 1)
        await check_exchange(backend, 1, sent, got, 100)
    assert f"plugin faulty raised in l4gw_{hook}" in gw.log


async def test_raising_observer_is_isolated(nursery, gateway, faulty_env):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    ok, boom = free_port(), free_port()
    gw = gateway(config(ok, boom, bport, "closed"), env=faulty_env)
    with trio.fail_after(10):
        for seed in range(2):
            sent, got = await scripted_exchange("127.0.0.1", boom, 10, 10, seed)
            await check_exchange(backend, seed, sent, got, 10)
        await trio.to_thread.run_sync(gw.wait_log, r"raised in l4gw_connection_closed", 10, 2)
    # The core's own record of the connection still happened after the failure.
    assert gw.log.count("backend_eof") + gw.log.count("client_eof") >= 2


def test_plugins_command_lists_entry_point_plugins(faulty_env):
    result = l4gw("plugins", env=faulty_env)
    assert result.returncode == 0
    assert "routing" in result.stdout
    assert "faulty         l4gw-test-faulty 1.0  l4gw_test_faulty" in result.stdout
