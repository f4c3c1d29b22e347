"""Configs that cannot work, given to a running ``l4gw run`` by SIGHUP; ``bind`` port 0.

Every bad file is refused with its key path, and the running configuration
stays: the listener keeps relaying, the admin endpoint keeps serving the old
``/config``. Nothing in the log quotes a password.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable

import pytest
import trio

from backends import echo_server, recv_exactly
from gwproc import GatewayProcess, free_port

pytestmark = pytest.mark.timeout(90)

SECRET = f"s3cr3t-{os.getpid()}"


def config(port: int, admin: int, backend: int, gateway: str = "", listener: str = "") -> str:
    return f"""
[gateway]
drain_timeout = "2s"
{gateway}

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"
{listener}

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"
"""


async def echo(port: int, data: bytes = b"ping") -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(data)
        assert await recv_exactly(stream, len(data)) == data


async def admin_config(admin: int) -> dict[str, object]:
    def get() -> dict[str, object]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        try:
            conn.request("GET", "/config")
            response = conn.getresponse()
            assert response.status == 200
            document: dict[str, object] = json.loads(response.read())["config"]
            return document
        finally:
            conn.close()

    return await trio.to_thread.run_sync(get)


def replace_bytes(gw: GatewayProcess, data: bytes) -> None:
    tmp = gw.config_path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, gw.config_path)


def as_directory(gw: GatewayProcess) -> None:
    gw.config_path.unlink()
    gw.config_path.mkdir()


async def test_a_reload_with_a_file_that_cannot_work_keeps_the_running_config(nursery, gateway):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    good = config(port, admin, backend)
    gw = gateway(good)
    before = await admin_config(admin)

    text: list[tuple[str, str, str]] = [
        (
            "buffer size 0",
            config(port, admin, backend, gateway="buffer_size = 0"),
            "gateway.buffer_size: must be at least 1KiB, got 0",
        ),
        (
            "absurd buffer size",
            config(port, admin, backend, gateway='buffer_size = "64GiB"'),
            'gateway.buffer_size: must be at most 64MiB, got "64GiB"',
        ),
        (
            "endpoint port 0",
            good.replace(f'"127.0.0.1:{backend}"', '"127.0.0.1:0"'),
            'cluster.echo.endpoints[0]: port 0 in "127.0.0.1:0"',
        ),
        (
            "PROXY headers trusted from nobody",
            config(port, admin, backend, listener="proxy_protocol = true"),
            "listener[0].proxy_protocol_trusted: required with proxy_protocol = true",
        ),
        (
            "peek_max 0",
            config(port, admin, backend, listener="peek_max = 0"),
            "listener[0].peek_max: must be at least 64, got 0",
        ),
        (
            "redis url with a bad port",
            good + f'\n[plugin.ratelimit]\nredis_url = "redis://gw:{SECRET}@127.0.0.1:99999/0"\n',
            'plugin.ratelimit.redis_url: invalid port "99999" (1 to 65535)',
        ),
        (
            "public admin without a token",
            good.replace(f'bind = "127.0.0.1:{admin}"', f'bind = "0.0.0.0:{admin}"'),
            f'admin.bind: "0.0.0.0:{admin}" is not loopback',
        ),
    ]
    bad: list[tuple[str, Callable[[GatewayProcess], None], str]] = [
        (name, lambda gw, t=t: gw.write_config(t), expected) for name, t, expected in text
    ]
    latin1 = good.replace("[gateway]", "[gateway]\n# café").encode("latin-1")
    offset = latin1.index(b"\xe9")
    bad.append(
        (
            "not UTF-8",
            lambda gw: replace_bytes(gw, latin1),
            f"not UTF-8 text (byte 0xe9 at offset {offset}, line 3)",
        )
    )
    bad.append(("a directory", as_directory, "cannot read: Is a directory"))

    with trio.fail_after(60):
        for count, (name, write, expected) in enumerate(bad, 1):
            await trio.to_thread.run_sync(write, gw)
            gw.signal(signal.SIGHUP)
            log = await trio.to_thread.run_sync(gw.wait_log, "reload failed", 10, count)
            assert f"{gw.config_path}: {expected}" in log, name
            await echo(port, name.encode())
            assert await admin_config(admin) == before, name
        assert "reloaded" not in gw.log
        assert "Traceback" not in gw.log
        assert SECRET not in gw.log
        # A good file is taken again, from the same path.
        gw.config_path.rmdir()
        gw.write_config(config(port, admin, backend, gateway='buffer_size = "128KiB"'))
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(gw.wait_log, "reloaded")
        shown = (await admin_config(admin))["gateway"]
        assert isinstance(shown, dict)  # the file's values, and every default (effective)
        assert (shown["drain_timeout"], shown["buffer_size"], shown["workers"]) == (
            "2s",
            "128KiB",
            1,
        )
        await echo(port)
    assert gw.proc is not None and gw.proc.poll() is None


async def test_bind_port_0_reports_the_port_it_got(nursery, gateway):
    """Port 0 is any free port: the ready line (and a reload's "opened on") says which,
    and that is where the listener serves."""
    backend = await nursery.start(echo_server)
    text = config(0, 0, backend)
    gw = gateway(text)
    match = re.search(r"ready: public=127\.0\.0\.1:(\d+)$", gw.log, re.M)
    assert match, gw.log
    port = int(match.group(1))
    assert port != 0
    admin = re.search(r"admin endpoint on http://127\.0\.0\.1:(\d+)/", gw.log)
    assert admin and int(admin.group(1)) != 0
    with trio.fail_after(20):
        await echo(port)
        second = text + '\n[[listener]]\nname = "more"\nbind = "[::1]:0"\n'
        second += '\n[[route]]\nlistener = "more"\ncluster = "echo"\n'
        gw.write_config(second)
        gw.signal(signal.SIGHUP)
        log = await trio.to_thread.run_sync(gw.wait_log, "reloaded")
        opened = re.search(r"listener more opened on \[::1\]:(\d+)$", log, re.M)
        assert opened and int(opened.group(1)) != 0, log
        async with await trio.open_tcp_stream("::1", int(opened.group(1))) as stream:
            await stream.send_all(b"v6")
            assert await recv_exactly(stream, 2) == b"v6"
        # The first listener kept its port (same bind, same socket).
        await echo(port)
