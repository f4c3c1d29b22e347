"""plugins/ratelimit/redis.py against a real redis-server: leases take a small
share of a bucket and give back what they did not spend."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from redisproc import RedisServer

from l4gw_plugins.ratelimit.buckets import Rule
from l4gw_plugins.ratelimit.redis import RedisBuckets, RedisSettings

from ratelimit_setup import Clock

pytestmark = pytest.mark.timeout(30)

SLOW = 1 / 3600  # a token an hour: nothing refills during a test


def buckets(url: str, clock: Clock | None = None, **kw: Any) -> RedisBuckets:
    values = {
        "url": url,
        "timeout": 2.0,
        "lease": 5,
        "lease_ttl": 1.0,
        "retry": 0.2,
        "key_prefix": "t:",
        "on_error": "closed",
        "max_tracked": 1000,
    } | kw
    return RedisBuckets(RedisSettings(**values), clock or Clock())


async def tokens_in_redis(b: RedisBuckets, key: str) -> float:
    return float(await b.client.call("HGET", f"t:{key}", "t"))


async def test_a_small_bucket_is_leased_one_token_at_a_time(redis: RedisServer) -> None:
    rule = Rule("per_client", SLOW, 5.0)
    one, two = buckets(redis.url), buckets(redis.url)
    answers = [await (one, two)[i % 2].acquire([(rule, "c")]) for i in range(10)]
    # The default lease (5) would have let the first process take the whole burst.
    assert answers[:5] == [None] * 5
    assert answers[5:] == ["per_client"] * 5
    assert one.leases.get(("per_client", "c"), object).tokens == 0  # type: ignore[attr-defined]


async def test_leases_shrink_as_the_bucket_empties(redis: RedisServer) -> None:
    rule = Rule("per_client", SLOW, 100.0)
    b = buckets(redis.url)
    grants = []
    while await b.acquire([(rule, "c")]) is None:
        lease = b.leases.get(("per_client", "c"), object)
        grants.append(lease.tokens + 1)  # type: ignore[attr-defined]
    # A fetch is where the tokens left after the spend went up again.
    fetched = [g for i, g in enumerate(grants) if i == 0 or grants[i - 1] == 1]
    assert fetched[0] == 5  # the lease cap: min(5, 100 // 4)
    assert max(fetched) <= 5 and fetched[-3:] == [1, 1, 1]
    assert len(grants) == 100  # every token spent, none lost


async def test_unspent_tokens_go_back_when_the_lease_ends(redis: RedisServer) -> None:
    rule = Rule("per_client", SLOW, 100.0)
    clock = Clock()
    b = buckets(redis.url, clock)
    assert await b.acquire([(rule, "c")]) is None  # took 5, spent 1
    assert await tokens_in_redis(b, "per_client:c") == pytest.approx(95, abs=0.01)
    assert await b.give_back() == 0  # not ended yet
    clock.now += 1.0
    assert await b.give_back() == 4
    assert await tokens_in_redis(b, "per_client:c") == pytest.approx(99, abs=0.01)
    # An ended lease also gives back in the call that takes the next one.
    assert await b.acquire([(rule, "c")]) is None
    clock.now += 1.5
    assert await b.acquire([(rule, "c")]) is None
    assert b.given_back == 8
    assert await tokens_in_redis(b, "per_client:c") == pytest.approx(99 - 5 + 4 - 5, abs=0.01)


async def test_stop_gives_back_what_is_held(redis: RedisServer) -> None:
    rule = Rule("per_client", SLOW, 40.0)
    b = buckets(redis.url, lease_ttl=60.0)
    async with trio.open_nursery() as nursery:
        b.start(nursery)
        assert await b.acquire([(rule, "c")]) is None  # took 5, spent 1
        assert await tokens_in_redis(b, "per_client:c") == pytest.approx(35, abs=0.01)
        b.stop()
    assert b.given_back == 4
    probe = buckets(redis.url)
    assert await tokens_in_redis(probe, "per_client:c") == pytest.approx(39, abs=0.01)
