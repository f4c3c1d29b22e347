"""Rate limiting on plain values, and the Redis backend against a real redis-server."""

from __future__ import annotations

import logging
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from redisproc import RedisServer

from gateway import Flow, Refusal, Route
from gateway.config import ConfigError, from_dict
from l4gw_plugins.ratelimit.buckets import (
    BACKEND_ERROR,
    BACKEND_LOCAL,
    LruTable,
    MemoryBuckets,
    Rule,
    TokenBucket,
    client_prefix,
    parse_url,
)
from l4gw_plugins.ratelimit.plugin import RateLimit
from l4gw_plugins.ratelimit.redis import (
    RedisBuckets,
    RedisSettings,
    RespClient,
    RespError,
    encode_command,
)

from backends import recv_all
from ratelimit_setup import BASE, Clock, section


def limiter(text: str) -> tuple[RateLimit, Clock]:
    clock = Clock()
    rl = RateLimit(clock=clock)
    rl.configure(section(text))
    return rl, clock


_ids = iter(range(1, 1_000_000))


def flow(client: str = "127.0.0.2", listener: str = "public") -> Flow:
    return Flow(next(_ids), listener, "tcp", (client, 40000), ("127.0.0.1", 443))


def route(rl: RateLimit, name: str = "main") -> Route:
    config = from_dict(tomllib.loads(BASE), "t", {})
    return Route(name, config.clusters["api"], config.clusters["api"].endpoints)


# --- pure pieces ----------------------------------------------------------------------


def test_token_bucket_refills_to_burst() -> None:
    rule = Rule("r", rate=2.0, burst=4.0)
    b = TokenBucket(4.0, 0.0)
    assert b.refill(0.0, rule) == 4.0
    b.tokens = 0.0
    assert b.refill(1.0, rule) == 2.0
    assert b.refill(100.0, rule) == 4.0
    # A clock that went backwards adds nothing.
    assert b.refill(50.0, rule) == 4.0


def test_memory_buckets_all_or_none() -> None:
    a, b = Rule("a", 1.0, 3.0), Rule("b", 1.0, 1.0)
    m = MemoryBuckets(100)
    assert m.acquire([(a, "x"), (b, "x")], 0.0) is None
    # b is empty: refused by b, and a keeps its tokens.
    assert m.acquire([(a, "x"), (b, "x")], 0.0) == b
    assert m.acquire([(a, "x")], 0.0) is None
    assert m.acquire([(a, "x")], 0.0) is None
    assert m.acquire([(a, "x")], 0.0) == a


def test_lru_table_cap_and_evictions() -> None:
    t: LruTable[int] = LruTable(3)
    for k in "abc":
        t.get(k, lambda: 1)
    t.get("a", lambda: 2)  # touch a: b is now the oldest
    t.get("d", lambda: 1)
    assert len(t) == 3 and t.evictions == 1
    assert "b" not in t and "a" in t and "d" in t


def test_client_prefix() -> None:
    assert client_prefix("198.51.100.77", 24, 64) == "198.51.100.0/24"
    assert client_prefix("2001:db8:1:2:3::9", 24, 64) == "2001:db8:1:2::/64"
    assert client_prefix("10.1.2.3", 16, 48) == "10.1.0.0/16"


# --- configuration ------------------------------------------------------------------------


def test_schema_defaults_and_problems() -> None:
    s = section("")
    assert s["per_client"] is None and s["backend"] == "memory" and s["refuse_with"] == "rst"
    with pytest.raises(ConfigError) as err:
        section(
            'per_client = { rate = 0, per = "0s" }\n'
            'per_prefix = { rate = 5, v4 = 33 }\nbackend = "disk"\nredis_url = "http://x"\n'
            "bogus = 1\n"
        )
    problems = "\n".join(err.value.problems)
    assert "plugin.ratelimit.per_client.rate: must be at least 1" in problems
    assert "plugin.ratelimit.per_prefix.v4: must be at most 32" in problems
    assert "plugin.ratelimit.backend: must be one of" in problems
    assert "plugin.ratelimit.redis_url: expected" in problems
    assert "plugin.ratelimit.bogus: unknown key" in problems
    with pytest.raises(ConfigError) as err:
        section('per_client = { rate = 5, per = "0s" }\n')
    assert err.value.problems == ["plugin.ratelimit.per_client.per: must be longer than 0s"]


# --- the plugin, memory backend -------------------------------------------------------------


def test_unconfigured_admits_everything() -> None:
    rl, _ = limiter("")
    for _ in range(1000):
        assert rl.admit(flow()) is None
    assert rl.tracked() == 0


def test_per_client_burst_then_refill_other_client_unaffected() -> None:
    rl, clock = limiter('per_client = { rate = 2, per = "1s", burst = 5 }\n')
    results = [rl.admit(flow("127.0.0.2")) for _ in range(8)]
    assert results[:5] == [None] * 5
    refusals = results[5:]
    assert all(isinstance(r, Refusal) and r.rule == "per_client" and r.reset for r in refusals)
    assert rl.refused == {"per_client": 3}
    assert all(rl.admit(flow("127.0.0.3")) is None for _ in range(5))
    clock.now += 1.0  # two tokens back
    assert [rl.admit(flow("127.0.0.2")) is None for _ in range(3)] == [True, True, False]


def test_per_prefix_and_listener() -> None:
    rl, _ = limiter(
        'per_prefix = { rate = 3, per = "1m", v4 = 24 }\n'
        'per_listener = { rate = 5, per = "1m" }\nrefuse_with = "fin"\n'
    )
    admitted = [rl.admit(flow(f"198.51.100.{i}")) is None for i in range(4)]
    assert admitted == [True, True, True, False]
    refusal = rl.admit(flow("198.51.100.200"))
    assert isinstance(refusal, Refusal) and refusal.rule == "per_prefix" and not refusal.reset
    # Another /24: its own prefix bucket, but the listener's bucket is shared.
    assert [rl.admit(flow(f"203.0.113.{i}")) is None for i in range(3)] == [True, True, False]
    refusal = rl.admit(flow("192.0.2.1"))
    assert isinstance(refusal, Refusal) and refusal.rule == "per_listener"
    assert rl.admit(flow("192.0.2.1", listener="other")) is None


def test_max_connections_per_client_counts_open_connections() -> None:
    rl, _ = limiter("max_connections_per_client = 2\n")
    a, b = flow(), flow()
    assert rl.admit(a) is None and rl.admit(b) is None
    c = flow()
    refusal = rl.admit(c)
    assert isinstance(refusal, Refusal) and refusal.rule == "max_connections_per_client"
    rl.closed(c)  # a refused flow closes too: it must not free a slot
    assert isinstance(rl.admit(flow()), Refusal)
    rl.closed(a)
    assert rl.admit(flow()) is None
    assert rl.per_client == {"127.0.0.2": 2}


def test_per_route_and_cluster_cap_after_routing() -> None:
    rl, _ = limiter('per_route = { rate = 3, per = "1m" }\nmax_connections_per_cluster = 2\n')
    flows = [flow() for _ in range(4)]
    assert rl.routed(flows[0], route(rl)) is None
    assert rl.routed(flows[1], route(rl)) is None
    refusal = rl.routed(flows[2], route(rl))
    assert isinstance(refusal, Refusal) and refusal.rule == "max_connections_per_cluster"
    rl.closed(flows[0])
    assert rl.routed(flows[3], route(rl)) is None
    refusal = rl.routed(flow(), route(rl))
    assert isinstance(refusal, Refusal) and refusal.rule == "max_connections_per_cluster"
    rl.closed(flows[1])
    refusal = rl.routed(flow(), route(rl))
    assert isinstance(refusal, Refusal) and refusal.rule == "per_route"


def test_max_tracked_evicts_and_reports() -> None:
    rl, _ = limiter('per_client = { rate = 1, per = "1h" }\nmax_tracked = 100\n')
    for i in range(250):
        assert rl.admit(flow(f"10.0.{i // 250}.{i % 250}")) is None
    assert rl.tracked() == 100
    assert rl.evictions() == 150
    # An evicted client starts over with a full bucket: the documented trade.
    assert rl.admit(flow("10.0.0.0")) is None


# --- Redis -------------------------------------------------------------------------------------


def test_parse_url_and_encoding() -> None:
    a = parse_url("redis://:s3cret@10.0.0.5:6380/2")
    assert (a.host, a.port, a.username, a.password, a.db) == ("10.0.0.5", 6380, None, "s3cret", 2)
    assert str(a) == "redis://10.0.0.5:6380/2"  # never the password
    a = parse_url("redis://[::1]")
    assert (a.host, a.port, a.db) == ("::1", 6379, 0)
    with pytest.raises(ValueError):
        parse_url("http://x")
    assert encode_command(["SET", "k", 1.5]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\n1.5\r\n"


@pytest.mark.timeout(30)
async def test_resp_client_against_redis(redis: RedisServer) -> None:
    c = RespClient(parse_url(redis.url))
    assert await c.call("PING") == "PONG"
    assert await c.call("SET", "k", "v" * 100_000) == "OK"
    assert await c.call("GET", "k") == b"v" * 100_000
    assert await c.call("GET", "missing") is None
    assert await c.call("RPUSH", "l", "a", "b") == 2
    assert await c.call("LRANGE", "l", 0, -1) == [b"a", b"b"]
    with pytest.raises(RespError, match="WRONGTYPE"):
        await c.call("GET", "l")
    # A call cut short closes the connection; the next one is not confused.
    with trio.move_on_after(0.05):
        await c.call("BLPOP", "nothing", 5)
    assert await c.call("PING") == "PONG"
    c.close()


def redis_settings(url: str, **kw: Any) -> RedisSettings:
    values = {
        "url": url,
        "timeout": 0.5,
        "lease": 2,
        "lease_ttl": 1.0,
        "retry": 0.2,
        "key_prefix": "t:",
        "on_error": "open",
        "max_tracked": 1000,
    } | kw
    return RedisSettings(**values)


@pytest.mark.timeout(30)
async def test_redis_buckets_are_shared_and_leased(redis: RedisServer) -> None:
    rule = Rule("per_client", rate=1 / 3600, burst=7.0)
    # Two instances stand for two gateway processes.
    a = RedisBuckets(redis_settings(redis.url))
    b = RedisBuckets(redis_settings(redis.url))
    admitted = 0
    for i in range(20):
        side = a if i % 2 else b
        if await side.acquire([(rule, "127.0.0.2")]) is None:
            admitted += 1
    # Leases can only lose tokens (one process may still hold one), never add.
    assert 6 <= admitted <= 7
    assert a.calls + b.calls < 20
    # Another key is untouched; two rules in one call.
    other = Rule("per_listener", rate=100.0, burst=100.0)
    assert await a.acquire([(rule, "127.0.0.3"), (other, "public")]) is None
    assert await a.acquire([(rule, "127.0.0.2"), (other, "public")]) == "per_client"


@pytest.mark.timeout(30)
async def test_redis_outage_open_closed_and_logged_once(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "l4gw.ratelimit")
    rule = Rule("per_client", rate=1000.0, burst=1000.0)
    open_ = RedisBuckets(redis_settings(redis.url, on_error="open", lease=1))
    closed = RedisBuckets(redis_settings(redis.url, on_error="closed", lease=1))
    local = RedisBuckets(redis_settings(redis.url, on_error="local", lease=1))
    assert await open_.acquire([(rule, "x")]) is None
    assert await closed.acquire([(rule, "x")]) is None
    redis.kill()
    for _ in range(50):
        assert await open_.acquire([(rule, "x")]) is None
        assert await closed.acquire([(rule, "x")]) == BACKEND_ERROR
        assert await local.acquire([(rule, "x")]) == BACKEND_LOCAL  # the plugin decides
    assert open_.outages == 1 and closed.outages == 1
    # Only the periodic retry touches the network while it is down.
    assert open_.errors < 5
    redis.start()
    with trio.fail_after(5):
        while await closed.acquire([(rule, "x")]) is not None:
            await trio.sleep(0.05)
    unusable = [r for r in caplog.records if "unusable" in r.getMessage()]
    back = [r for r in caplog.records if "answers again after" in r.getMessage()]
    assert len(unusable) == 3  # one per instance, not one per connection
    assert len(back) == 1


@pytest.mark.timeout(30)
async def test_plugin_with_redis_backend(redis: RedisServer) -> None:
    rl, _ = limiter(
        f'backend = "redis"\nredis_url = "{redis.url}"\n'
        'per_client = { rate = 1, per = "1h", burst = 3 }\n'
        'per_route = { rate = 1, per = "1h", burst = 2 }\n'
    )
    results = []
    for _ in range(5):
        result = rl.admit(flow())
        if not isinstance(result, Refusal | None):
            result = await result
        results.append(result)
    assert results[:3] == [None] * 3
    assert all(isinstance(r, Refusal) and r.rule == "per_client" for r in results[3:])
    routed = []
    for _ in range(3):
        result = rl.routed(flow(), route(rl))
        if not isinstance(result, Refusal | None):
            result = await result
        routed.append(result)
    assert routed[:2] == [None, None]
    assert isinstance(routed[2], Refusal) and routed[2].rule == "per_route"


# --- shaping ---------------------------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def test_relay_hook_only_when_shaping() -> None:
    rl, _ = limiter("")
    a, b = tcp_pair()
    with a, b:
        assert rl.l4gw_relay(flow(), a, b, 10.0) is None


@pytest.mark.timeout(30)
async def test_shaped_relay_paces_both_directions_and_keeps_bytes() -> None:
    rate, size = 64 * 1024, 96 * 1024
    client_app, client_gw = tcp_pair()
    upstream_gw, upstream_app = tcp_pair()
    for s_ in (client_gw, upstream_gw):
        s_.setblocking(False)
    rl, _ = limiter(f"bytes_per_second = {rate}\n")
    f = flow()
    relay = rl.l4gw_relay(f, client_gw, upstream_gw, 30.0)
    assert relay is not None
    up_payload, down_payload = os.urandom(size), os.urandom(size)
    got: dict[str, bytes] = {}
    reason: list[str] = []

    async def run_relay() -> None:
        reason.append(await relay)

    async def side(sock: socket.socket, payload: bytes, name: str) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        async with stream, trio.open_nursery() as n:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            n.start_soon(send)
            got[name] = await recv_all(stream)

    started = trio.current_time()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            n.start_soon(run_relay)
            n.start_soon(side, client_app, up_payload, "client")
            n.start_soon(side, upstream_app, down_payload, "upstream")
    took = trio.current_time() - started
    client_gw.close()
    upstream_gw.close()
    assert got["upstream"] == up_payload and got["client"] == down_payload
    assert (f.bytes_from_client, f.bytes_to_client) == (size, size)
    assert reason[0] in ("client_eof", "backend_eof")
    # Paced: everything past the first burst (16 KiB) at 64 KiB/s.
    assert took >= (size - 16 * 1024) / rate * 0.9, f"took {took:.2f}s"


@pytest.mark.timeout(30)
async def test_redis_password_and_script_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "l4gw.ratelimit")
    server = RedisServer(tmp_path, extra=("--requirepass", "s3cret")).start()
    try:
        rule = Rule("per_client", rate=100.0, burst=100.0)
        good = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        ok = RedisBuckets(redis_settings(good, lease=1))
        assert await ok.acquire([(rule, "x")]) is None
        # The script cache is gone (a Redis restart, SCRIPT FLUSH): EVAL again.
        await ok.client.call("SCRIPT", "FLUSH")
        assert await ok.acquire([(rule, "y")]) is None
        assert await ok.client.call("EXISTS", "t:per_client:y") == 1  # in db 3
        bad = RedisBuckets(redis_settings(good.replace("s3cret", "wrong"), on_error="closed"))
        for _ in range(20):
            assert await bad.acquire([(rule, "x")]) == BACKEND_ERROR
            await trio.sleep(0.02)  # a few retries (redis_retry is 200ms)
        assert bad.outages == 1 and bad.errors >= 2
        messages = [r.getMessage() for r in caplog.records]
        assert sum("unusable" in m for m in messages) == 1
        assert not any("answers again after" in m for m in messages)
    finally:
        server.stop()


def metric_points(reader: Any) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.data.data_points)
    return out


def test_cap_evictions_and_refusals_are_metrics() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    rl = RateLimit(meter_provider=MeterProvider(metric_readers=[reader]))
    rl.configure(section('per_client = { rate = 1, per = "1h", burst = 1 }\nmax_tracked = 10\n'))
    for i in range(25):
        rl.admit(flow(f"10.9.0.{i}"))
    rl.admit(flow("10.9.0.24"))  # its bucket is empty
    points = metric_points(reader)
    assert [p.value for p in points["l4gw.ratelimit.buckets"]] == [10]
    assert [p.value for p in points["l4gw.ratelimit.buckets.limit"]] == [10]
    assert [p.value for p in points["l4gw.ratelimit.evicted"]] == [15]
    [refused] = points["l4gw.ratelimit.refused"]
    assert refused.value == 1 and refused.attributes == {"l4gw.ratelimit.rule": "per_client"}


ALL_IDLE = {"l4gw_admit", "l4gw_routed", "l4gw_connection_closed", "l4gw_relay"}


@pytest.mark.parametrize(
    ("text", "idle"),
    [
        ("", ALL_IDLE),
        ('per_client = { rate = 2, per = "1s" }\n', ALL_IDLE - {"l4gw_admit"}),
        ('per_listener = { rate = 2, per = "1s" }\n', ALL_IDLE - {"l4gw_admit"}),
        (
            "max_connections_per_client = 2\n",
            ALL_IDLE - {"l4gw_admit", "l4gw_connection_closed"},
        ),
        ('per_route = { rate = 3, per = "1m" }\n', ALL_IDLE - {"l4gw_routed"}),
        (
            "max_connections_per_cluster = 2\n",
            ALL_IDLE - {"l4gw_routed", "l4gw_connection_closed"},
        ),
        ('bytes_per_second = "1MiB"\n', ALL_IDLE - {"l4gw_relay"}),
        (
            'shield_after = { refusals = 3, per = "10s", ttl = "2m" }\n',
            ALL_IDLE - {"l4gw_admit"},
        ),
    ],
)
def test_what_is_not_configured_costs_a_connection_no_hook_call(text: str, idle: set[str]) -> None:
    rl, _ = limiter(text)
    assert rl.idle_hooks() == idle
