"""The admin endpoint of a real ``l4gw run``: probes, token, /metrics, /connections, /config,
the connection cap, and a bind that is not loopback."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from backends import echo_server, recv_all, recv_exactly
from gwproc import free_port, l4gw, refused
from netns import GW_CLIENT_SIDE4, tcp_connect
from netns import topology as topology  # the fixture

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


async def accept_queue(port: int) -> int:
    """Connections the kernel holds for the socket listening on 127.0.0.1:``port``, not
    yet accepted (a listening socket's Recv-Q)."""
    done = await trio.run_process(
        ["ss", "-Hltn", f"src 127.0.0.1 and sport = :{port}"], capture_stdout=True
    )
    return sum(int(line.split()[1]) for line in done.stdout.decode().splitlines())


async def test_admin_connections_are_capped_and_leave_the_data_plane_alone(nursery, gateway):
    """More idle admin connections than ``max_connections``: the extra ones wait in the
    kernel backlog (the gateway holds nothing for them), the data plane serves, and a
    request that waited is answered once the idle ones are gone."""
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    gw = gateway(config(port, admin, backend) + "max_connections = 2\n")
    idle: list[trio.SocketStream] = []
    # The idle ones must be in place well within admin.READ_TIMEOUT (5 s), after which
    # the gateway closes the two it accepted: a few local connects take milliseconds.
    with trio.fail_after(4):
        try:
            for _ in range(5):
                idle.append(await trio.open_tcp_stream("127.0.0.1", admin))
            while await accept_queue(admin) < 3:
                await trio.sleep(0.02)
            waiting = await trio.open_tcp_stream("127.0.0.1", admin)
            await waiting.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            while await accept_queue(admin) < 4:
                await trio.sleep(0.02)
            assert await accept_queue(admin) == 4  # two taken, four waiting: the cap holds
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"ping")
                assert await recv_exactly(stream, 4) == b"ping"
        finally:
            for stream in idle:
                await stream.aclose()
    with trio.fail_after(10):
        async with waiting:
            response = await recv_all(waiting)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n") and response.endswith(b"\r\n\r\nok\n")
    assert "admin endpoint: 2 connections open ([admin] max_connections)" in gw.log
    assert await accept_queue(admin) == 0


def test_a_public_admin_bind_without_token_does_not_start(tmp_path):
    port = free_port()
    text = config(port, 9901, free_port()).replace(
        f'bind = "127.0.0.1:9901"\ntoken = "{TOKEN}"', 'bind = "0.0.0.0:9901"'
    )
    path = tmp_path / "public-admin.toml"
    path.write_text(text)
    result = l4gw("run", "-c", str(path), timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith(f'{path}: admin.bind: "0.0.0.0:9901" is not loopback')
    assert "Traceback" not in result.stderr


@pytest.mark.privileged
async def test_insecure_admin_warns_and_serves(nursery, gateway, topology):
    """``insecure = true``: served to the network without a token, and said at start. In
    the gateway namespace of the test topology, so the bind reaches no real network."""
    port = free_port()
    text = config(port, 9901, 9).replace(
        f'bind = "127.0.0.1:9901"\ntoken = "{TOKEN}"',
        f'bind = "{GW_CLIENT_SIDE4}:9901"\ninsecure = true',
    )
    gw = gateway(text, netns=topology.gateway)
    assert re.search(
        rf"WARNING l4gw.admin: admin endpoint on {GW_CLIENT_SIDE4}:9901 serves /config, "
        r"/connections and /metrics to the network without a token \(\[admin\] insecure = true\)",
        gw.log,
    ), gw.log
    with trio.fail_after(10):
        stream = await tcp_connect(topology.client, GW_CLIENT_SIDE4, 9901)
        async with stream:
            await stream.send_all(b"GET /config HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await recv_all(stream)
    assert response.startswith(b"HTTP/1.1 200 OK"), response


async def test_request_head_bounded_in_size_and_in_time(admin_gateway):
    """A head over MAX_HEAD gets 431; one that trickles in gets 408 once READ_TIMEOUT has
    passed since the connection was accepted, however steadily its bytes come."""
    from gateway.admin import MAX_HEAD

    _, _, admin = admin_gateway
    with trio.fail_after(20):
        async with await trio.open_tcp_stream("127.0.0.1", admin) as stream:
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD)
            response = await recv_all(stream)
        assert response.startswith(b"HTTP/1.1 431 "), response[:80]

        async with await trio.open_tcp_stream("127.0.0.1", admin) as stream:

            async def trickle() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"s" * 100:
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                response = await recv_all(stream)
                nursery.cancel_scope.cancel()
        assert response.startswith(b"HTTP/1.1 408 "), response[:80]
