"""Rate limits through real ``l4gw run`` processes, locally and shared through Redis.

Clients bind 127.0.0.2, 127.0.0.3 ... as their source address, so one
machine plays several clients.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from redisproc import RedisServer

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


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


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
