"""The admin endpoint of a real ``l4gw run``: probes, token, /metrics, /connections, /config."""

from __future__ import annotations

import http.client
import json
import os
import signal
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from backends import echo_server, recv_exactly
from gwproc import free_port, refused

pytestmark = pytest.mark.timeout(60)

TOKEN = f"t0ken-{os.getpid()}"


def config(port: int, admin: int, backend: int, drain: str = "2s") -> str:
    return f"""
[gateway]
drain_timeout = "{drain}"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
name = "echo"
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"
token = "{TOKEN}"
"""


def _get(
    port: int, path: str, token: str | None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


async def get(
    port: int, path: str, token: str | None = TOKEN, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(_get, port, path, token, method)


async def get_json(port: int, path: str) -> Any:
    status, _, body = await get(port, path)
    assert status == 200, body
    return json.loads(body)


@pytest.fixture
async def admin_gateway(nursery, gateway):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    gw = gateway(config(port, admin, backend))
    return gw, port, admin


async def test_probes_and_token(admin_gateway):
    _, _, admin = admin_gateway
    status, _, body = await get(admin, "/healthz", token=None)
    assert (status, body) == (200, b"ok\n")
    status, _, body = await get(admin, "/readyz", token=None)
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True
    assert ready["listeners_open"] == ["public"]
    for path in ("/metrics", "/connections", "/config", "/status"):
        status, headers, _ = await get(admin, path, token=None)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == "Bearer"
        assert (await get(admin, path, token="wrong"))[0] == 401
        assert (await get(admin, path))[0] == 200
    assert (await get(admin, "/nope"))[0] == 404
    assert (await get(admin, "/healthz", method="POST"))[0] == 405
    status, headers, body = await get(admin, "/healthz", token=None, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "3")


async def test_status_shows_relay_tiers(admin_gateway):
    _, _, admin = admin_gateway
    document = await get_json(admin, "/status")
    tiers = document["relay"]["tiers"]
    assert set(tiers) == {"sockmap", "splice", "copy"}
    assert tiers["copy"]["enabled"] is True
    for tier in tiers.values():  # enabled, or a reason why not
        assert tier["enabled"] or tier["why_not"]


async def test_config_is_redacted(admin_gateway):
    _, _, admin = admin_gateway
    status, _, body = await get(admin, "/config")
    assert status == 200
    assert TOKEN.encode() not in body
    document = json.loads(body)
    assert document["config"]["admin"]["token"] == "<redacted>"
    assert document["config"]["cluster"]["echo"]["endpoints"]


async def test_connections_show_live_bytes_and_metrics_parse(admin_gateway):
    _, port, admin = admin_gateway
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client_port = stream.socket.getsockname()[1]

    async def mine() -> dict[str, Any] | None:
        document = await get_json(admin, "/connections")
        for record in document["connections"]:
            if record["client"] == f"127.0.0.1:{client_port}":
                return dict(record)
        return None

    async def wait_bytes(sent: int) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                record = await mine()
                if record and record["bytes_from_client"] == record["bytes_to_client"] == sent:
                    return record
                await trio.sleep(0.05)

    async with stream:
        await stream.send_all(b"x" * 1000)
        assert await recv_exactly(stream, 1000) == b"x" * 1000
        record = await wait_bytes(1000)
        assert record["listener"] == "public"
        assert record["destination"] == f"127.0.0.1:{port}"
        assert record["route"] == "echo"
        assert record["cluster"] == "echo"
        assert record["endpoint"].startswith("127.0.0.1:")
        assert record["tier"] == "copy"
        assert record["spliced"] is False
        assert record["age_seconds"] >= 0
        # The counts are live: more bytes, bigger numbers, same connection.
        await stream.send_all(b"y" * 500)
        assert await recv_exactly(stream, 500) == b"y" * 500
        later = await wait_bytes(1500)
        assert later["id"] == record["id"]

        status, headers, body = await get(admin, "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        active = families["l4gw_connection_active"]
        assert sum(s.value for s in active.samples) == 1
    with trio.fail_after(10):
        while await mine() is not None:
            await trio.sleep(0.05)

    status, _, body = await get(admin, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    closed = families["l4gw_connection_closed"]
    assert sum(s.value for s in closed.samples if s.name.endswith("_total")) == 1
    io = {
        s.labels["network_io_direction"]: s.value
        for s in families["l4gw_io_bytes"].samples
        if s.name.endswith("_total")
    }
    assert io == {"receive": 1500, "transmit": 1500}
    assert "l4gw_connection_duration_seconds" in families
    assert "l4gw_upstream_connect_duration_seconds" in families
    assert "process_open_fds" in families


async def test_readyz_fails_while_draining(nursery, gateway):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    gw = gateway(config(port, admin, backend, drain="20s"))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"hold")
        assert await recv_exactly(stream, 4) == b"hold"
        gw.signal(signal.SIGTERM)
        await trio.to_thread.run_sync(gw.wait_log, r"draining 1 connections")
        status, _, body = await get(admin, "/readyz", token=None)
        assert status == 503
        assert json.loads(body)["ready"] is False
    assert await trio.to_thread.run_sync(gw.wait, 15) == 0


async def test_reload_moves_and_closes_the_endpoint(nursery, gateway):
    """SIGHUP: a new ``[admin] bind`` is served at once (bound before the old one
    closes), a new token too, and removing ``[admin]`` closes it."""
    backend = await nursery.start(echo_server)
    port, first, second = free_port(), free_port(), free_port()
    gw = gateway(config(port, first, backend))
    with trio.fail_after(30):
        assert (await get(first, "/healthz"))[0] == 200
        gw.write_config(config(port, second, backend).replace(TOKEN, TOKEN + "-new"))
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(
            gw.wait_log, rf"admin endpoint on http://127\.0\.0\.1:{second}/"
        )
        assert (await get(second, "/healthz"))[0] == 200
        assert (await get(second, "/config", token=TOKEN))[0] == 401
        assert (await get(second, "/config", token=TOKEN + "-new"))[0] == 200
        while not await refused(first):  # the old endpoint closes right after
            await trio.sleep(0.05)
        # Two reloads in a row: the endpoint ends up on the last address only.
        third, fourth = free_port(), free_port()
        gw.write_config(config(port, third, backend))
        gw.signal(signal.SIGHUP)
        gw.write_config(config(port, fourth, backend))
        gw.signal(signal.SIGHUP)
        while await refused(fourth):
            await trio.sleep(0.05)
        assert (await get(fourth, "/healthz"))[0] == 200
        for gone in (second, third):
            while not await refused(gone):
                await trio.sleep(0.05)
        second = fourth
        text = config(port, second, backend)
        gw.write_config(text[: text.index("[admin]")])
        gw.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(gw.wait_log, "admin endpoint closed")
        assert await refused(second), gw.log
        # The gateway itself kept serving through both reloads.
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"ping")
            assert await recv_exactly(stream, 4) == b"ping"
    assert "take effect at the next restart" in gw.log  # /metrics went with [admin]
