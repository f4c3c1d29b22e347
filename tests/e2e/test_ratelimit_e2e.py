"""Rate limits through real ``l4gw run`` processes, locally and shared through Redis.

Clients bind 127.0.0.2, 127.0.0.3 ... as their source address, so one
machine plays several clients. Redis is a real redis-server, also as operators
run it: TLS with a client certificate (certificates made here with trustme), an
ACL user, the URL read from a secret file.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from redisproc import RedisServer

from l4gw_plugins.ratelimit.buckets import parse_url
from l4gw_plugins.ratelimit.resp import RespClient

from backends import echo_server
from gwproc import free_port


async def echo_once(
    port: int,
    source: str,
    echoed: trio.Event | None = None,
    hold: trio.Event | None = None,
) -> bool:
    """One connection from ``source``: True when the echo came back (admitted).

    With ``hold``, the connection stays open (after setting ``echoed``)
    until ``hold`` is set. A refused connection is reset or closed by the
    gateway, possibly before ``connect`` returns.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.bind((source, 0))
    got = b""
    with trio.fail_after(5):
        try:
            await sock.connect(("127.0.0.1", port))
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(b"hello")
                while len(got) < 5:
                    chunk = await stream.receive_some(5 - len(got))
                    if not chunk:
                        break
                    got += chunk
                if got == b"hello" and hold is not None:
                    assert echoed is not None
                    echoed.set()
                    await hold.wait()
        except (trio.BrokenResourceError, OSError):
            return False
        finally:
            sock.close()
    return got == b"hello"


def config(port: int, backend: int, ratelimit: str) -> str:
    return f"""
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[plugin.ratelimit]
{ratelimit}
"""


@pytest.mark.timeout(60)
async def test_burst_from_one_client_is_limited_another_is_not(nursery, gateway):
    backend = await nursery.start(echo_server)
    port = free_port()
    gw = gateway(config(port, backend, 'per_client = { rate = 1, per = "1m", burst = 5 }\n'))
    results: list[bool] = []

    async def one() -> None:
        results.append(await echo_once(port, "127.0.0.2"))

    async with trio.open_nursery() as burst:
        for _ in range(20):
            burst.start_soon(one)
    assert results.count(True) == 5
    assert [await echo_once(port, "127.0.0.3") for _ in range(5)] == [True] * 5
    gw.wait_log(r"client=127\.0\.0\.2:\d+ .* refused by=ratelimit/per_client", count=15)
    assert "client=127.0.0.3" not in "".join(
        line for line in gw.log.splitlines() if "refused" in line
    )


@pytest.mark.timeout(60)
async def test_concurrent_connection_cap_per_client(nursery, gateway):
    backend = await nursery.start(echo_server)
    port = free_port()
    gateway(config(port, backend, "max_connections_per_client = 2\n"))
    release = trio.Event()
    held: list[bool] = []

    async def hold(echoed: trio.Event) -> None:
        held.append(await echo_once(port, "127.0.0.4", echoed, release))

    async with trio.open_nursery() as n:
        first, second = trio.Event(), trio.Event()
        n.start_soon(hold, first)
        n.start_soon(hold, second)
        with trio.fail_after(5):
            await first.wait()
            await second.wait()
        # Two open from 127.0.0.4: a third is refused, another client is not.
        assert await echo_once(port, "127.0.0.4") is False
        assert await echo_once(port, "127.0.0.5") is True
        release.set()
    assert held == [True, True]
    # Closed connections give their slots back.
    with trio.fail_after(5):
        while not await echo_once(port, "127.0.0.4"):
            await trio.sleep(0.02)


@pytest.mark.timeout(90)
async def test_redis_limits_hold_across_two_gateways_and_survive_an_outage(nursery, gateway, redis):
    backend = await nursery.start(echo_server)
    shared = (
        f'backend = "redis"\nredis_url = "{redis.url}"\nredis_lease = 2\nredis_retry = "200ms"\n'
        'per_client = { rate = 1, per = "1h", burst = 6 }\n'
    )
    port_a, port_b = free_port(), free_port()
    gw_a = gateway(config(port_a, backend, shared + 'on_backend_error = "open"\n'), name="a")
    gw_b = gateway(config(port_b, backend, shared + 'on_backend_error = "closed"\n'), name="b")
    port_c = free_port()  # the default: this gateway's own buckets while Redis is down
    gw_c = gateway(config(port_c, backend, shared), name="c")

    admitted = [await echo_once((port_a, port_b)[i % 2], "127.0.0.2") for i in range(24)]
    # Alone, each gateway would admit 6 (12 in all). Shared, at most 6 pass;
    # a lease still held by one process can cost up to one token each.
    assert 4 <= admitted.count(True) <= 6, admitted
    assert admitted.count(True) > 0 and admitted[-6:] == [False] * 6
    assert [await echo_once((port_a, port_b)[i % 2], "127.0.0.3") for i in range(4)] == [True] * 4

    redis.kill()
    a = [await echo_once(port_a, "127.0.0.6") for _ in range(10)]
    b = [await echo_once(port_b, "127.0.0.6") for _ in range(10)]
    assert a == [True] * 10, "fail open: admitted while Redis is down"
    assert b == [False] * 10, "fail closed: refused while Redis is down"
    c = [await echo_once(port_c, "127.0.0.6") for _ in range(10)]
    assert c == [True] * 6 + [False] * 4, "local: the burst of 6 from this gateway's buckets"
    gw_c.wait_log(r"refused by=ratelimit/per_client", count=4)
    gw_b.wait_log(r"refused by=ratelimit/backend_error", count=10)
    for gw in (gw_a, gw_b, gw_c):
        gw.wait_log(r"redis redis://127\.0\.0\.1:\d+/0 unusable")
        assert gw.log.count("unusable") == 1, "one log line per outage, not per connection"

    redis.start()
    with trio.fail_after(10):
        while not await echo_once(port_b, "127.0.0.7"):
            await trio.sleep(0.1)
    gw_b.wait_log(r"answers again after")
    # The gateways kept serving throughout.
    assert await echo_once(port_a, "127.0.0.8") is True


@pytest.mark.timeout(60)
async def test_two_gateways_share_a_burst_of_five_with_the_default_lease(nursery, gateway, redis):
    """One client alternating over two gateways gets the burst of its bucket, the
    first connection through each gateway among them (issue 16: a lease took the
    whole burst, and the client's first connection through the second gateway was
    refused)."""
    backend = await nursery.start(echo_server)
    shared = (
        f'backend = "redis"\nredis_url = "{redis.url}"\n'
        'per_client = { rate = 5, per = "1s", burst = 5 }\n'
    )
    ports = free_port(), free_port()
    for i, port in enumerate(ports):
        gateway(config(port, backend, shared), name=f"gw{i}")
    started = trio.current_time()
    served = [await echo_once(ports[i % 2], "127.0.0.9") for i in range(20)]
    elapsed = trio.current_time() - started
    assert served[0] and served[1], served
    # 5, give or take one per gateway; plus what the bucket refilled meanwhile
    # (5 tokens/s), which a slow machine can make more than nothing.
    assert 5 - 2 <= served.count(True) <= 5 + 2 + int(5 * elapsed), (served, elapsed)


@pytest.mark.timeout(60)
async def test_a_stopping_gateway_gives_its_unspent_lease_back(nursery, gateway, redis):
    backend = await nursery.start(echo_server)
    port = free_port()
    gw = gateway(
        config(
            port,
            backend,
            f'backend = "redis"\nredis_url = "{redis.url}"\nredis_lease_ttl = "1m"\n'
            'per_client = { rate = 1, per = "1h", burst = 40 }\n',
        )
    )
    assert await echo_once(port, "127.0.0.13")
    client = RespClient(parse_url(redis.url))
    key = "l4gw:rl:per_client:127.0.0.13"
    assert float(await client.call("HGET", key, "t")) == pytest.approx(35, abs=0.1)  # leased 5
    assert gw.stop() == 0
    assert float(await client.call("HGET", key, "t")) == pytest.approx(39, abs=0.1)  # 4 back
    client.close()


# --- Redis as operators run it -------------------------------------------------------

PASSWORD = f"pw-{os.urandom(6).hex()}"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    """redis-server with TLS (client certificates required) and an ACL user "gw"
    limited to the gateway's keys; the default user is off."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "redis.test")
    client = ca.issue_cert("l4gw-client.test")
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    server.private_key_pem.write_to_path(str(certs / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(certs / "client.pem"))
    client.private_key_pem.write_to_path(str(certs / "client.key"))
    tls_port = free_port()
    redis = RedisServer(
        tmp_path,
        extra=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(certs / "server.pem"),
            "--tls-key-file",
            str(certs / "server.key"),
            "--tls-ca-cert-file",
            str(certs / "ca.pem"),
            "--tls-auth-clients",
            "yes",
            "--user",
            "default",
            "off",
            "--user",
            "gw",
            "on",
            f">{PASSWORD}",
            "~l4gw:rl:*",
            "+@all",
        ),
    ).start()
    try:
        yield redis, tls_port, certs
    finally:
        redis.stop()


def tls_section(url_file: Path, certs: Path, extra: str = "") -> str:
    return (
        f'backend = "redis"\nredis_url_file = "{url_file}"\nredis_retry = "200ms"\n'
        f'redis_tls = {{ ca_file = "{certs}/ca.pem", cert_file = "{certs}/client.pem", '
        f'key_file = "{certs}/client.key", server_name = "redis.test" }}\n'
        'per_client = { rate = 1, per = "1h", burst = 4 }\n' + extra
    )


@pytest.mark.timeout(60)
async def test_tls_acl_user_and_a_wrong_password(nursery, gateway, tls_redis, tmp_path):
    redis, tls_port, certs = tls_redis
    backend = await nursery.start(echo_server)
    good = tmp_path / "redis-url"
    good.write_text(f"rediss://gw:{PASSWORD}@127.0.0.1:{tls_port}/0\n")
    ports = free_port(), free_port()
    gws = [
        gateway(config(port, backend, tls_section(good, certs)), name=f"tls{i}")
        for i, port in enumerate(ports)
    ]
    served = [await echo_once(ports[i % 2], "127.0.0.10") for i in range(10)]
    # Shared over TLS as the ACL user: the burst of 4, the first through each among them.
    assert served[:2] == [True, True] and served.count(True) == 4, served
    for gw in gws:
        assert "unusable" not in gw.log, gw.log
        assert PASSWORD not in gw.log

    wrong = tmp_path / "redis-url-wrong"
    wrong.write_text(f"rediss://gw:not-{PASSWORD}@127.0.0.1:{tls_port}/0\n")
    port = free_port()
    bad = gateway(
        config(port, backend, tls_section(wrong, certs, 'on_backend_error = "closed"\n')),
        name="wrongpw",
    )
    assert [await echo_once(port, "127.0.0.11") for _ in range(6)] == [False] * 6
    bad.wait_log(r"refused by=ratelimit/backend_error", count=6)
    line = bad.wait_log(r"unusable \(WRONGPASS")
    assert "check the user name and password of redis_url" in line
    assert f"rediss://127.0.0.1:{tls_port}/0" in line
    assert bad.log.count("unusable") == 1, "one line, not one per connection"
    assert PASSWORD not in bad.log


@pytest.mark.timeout(60)
async def test_redis_secrets_never_show_in_config(nursery, gateway, tls_redis, tmp_path):
    redis, tls_port, certs = tls_redis
    backend = await nursery.start(echo_server)
    url = tmp_path / "redis-url"
    url.write_text(f"rediss://gw:{PASSWORD}@127.0.0.1:{tls_port}/0")
    port, admin = free_port(), free_port()
    gateway(
        config(port, backend, tls_section(url, certs)) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    )

    def get() -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
        try:
            conn.request("GET", "/config")
            return conn.getresponse().read()
        finally:
            conn.close()

    body = await trio.to_thread.run_sync(get)
    assert PASSWORD.encode() not in body
    section = json.loads(body)["config"]["plugin"]["ratelimit"]
    assert section["redis_url_file"] == str(url)
    assert section["redis_tls"]["server_name"] == "redis.test"
    assert section["redis_lease_ttl"] == "1s"
    assert await echo_once(port, "127.0.0.12")
