"""``shield_after``: the threshold, the window, which refusals count, and admit enforcement."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest

from gateway import Refusal
from gateway.config import ConfigError
from gateway.shield import table
from gateway.shield.never import NeverList
from gateway.testing import make_flow
from l4gw_plugins.ratelimit.plugin import RateLimit

from ratelimit_setup import Clock, section
from shieldtable import installed


@pytest.fixture
def shield() -> Iterator[table.Shield]:
    never = NeverList.build(trusted=[("lb", ip_network("198.18.9.9/32"))])
    with installed(table.Shield(None, never=never)) as fresh:
        yield fresh


LIMITED = """
per_client = { rate = 1, per = "1m", burst = 1 }
shield_after = { refusals = 3, per = "10s", ttl = "2m" }
"""


def admit(rl: RateLimit, client: str) -> Refusal | None:
    result = rl.l4gw_admit(make_flow(client=client))
    assert result is None or isinstance(result, Refusal)
    return result


def test_threshold_within_the_window_shields_the_client(shield: table.Shield) -> None:
    clock = Clock()
    rl = RateLimit(clock=clock)
    rl.configure(section(LIMITED))
    assert admit(rl, "192.0.2.1") is None  # the one token
    for _ in range(2):
        refused = admit(rl, "192.0.2.1")
        assert refused is not None and refused.rule == "per_client"
    assert shield.lookup("192.0.2.1") is None  # 2 refusals: below the threshold
    refused = admit(rl, "192.0.2.1")
    assert refused is not None and refused.rule == "per_client"
    entry = shield.lookup("192.0.2.1")
    assert entry is not None
    assert (entry.source, str(entry.network)) == ("ratelimit", "192.0.2.1/32")
    assert entry.reason == "rate limited: 3 refusals in 10s (per_client)"
    assert entry.expires_in(shield.clock_ns()) == pytest.approx(120, abs=1)
    # From now on refused as shielded, before the buckets (the kernel's job when it is on).
    refused = admit(rl, "192.0.2.1")
    assert refused is not None and refused.rule == "shield"
    assert admit(rl, "192.0.2.2") is None  # another client is served


def test_refusals_spread_over_more_than_the_window_do_not_shield(shield: table.Shield) -> None:
    clock = Clock()
    rl = RateLimit(clock=clock)
    rl.configure(section(LIMITED))
    admit(rl, "192.0.2.1")
    for _ in range(6):
        clock.now += 6  # a window holds two refusals at most: the third is 12 s after
        assert admit(rl, "192.0.2.1") is not None
    assert shield.entries() == []


def test_per_listener_refusals_do_not_count(shield: table.Shield) -> None:
    rl = RateLimit(clock=Clock())
    rl.configure(
        section(
            'per_listener = { rate = 1, per = "1m", burst = 1 }\n'
            'shield_after = { refusals = 2, per = "10s", ttl = "1m" }\n'
        )
    )
    admit(rl, "192.0.2.1")
    for _ in range(5):
        refused = admit(rl, "192.0.2.1")
        assert refused is not None and refused.rule == "per_listener"
    assert shield.entries() == []


def test_a_never_listed_client_is_not_shielded_and_warned_once(
    shield: table.Shield, caplog: pytest.LogCaptureFixture
) -> None:
    rl = RateLimit(clock=Clock())
    rl.configure(section(LIMITED.replace("refusals = 3", "refusals = 1")))
    admit(rl, "198.18.9.9")
    for _ in range(5):
        assert admit(rl, "198.18.9.9") is not None
    assert shield.entries() == []
    warnings = [r for r in caplog.records if "crossed shield_after" in r.getMessage()]
    assert len(warnings) == 1
    assert "proxy_protocol_trusted of listener lb" in warnings[0].getMessage()


def test_without_shield_after_nothing_is_shielded(shield: table.Shield) -> None:
    rl = RateLimit(clock=Clock())
    rl.configure(section('per_client = { rate = 1, per = "1m", burst = 1 }\n'))
    for _ in range(30):
        admit(rl, "192.0.2.1")
    assert shield.entries() == []


@pytest.mark.parametrize(
    "value,problem",
    [
        ('{ refusals = 20, per = "10s" }', "ttl"),
        ('{ refusals = 0, per = "10s", ttl = "2m" }', "refusals"),
        ('{ refusals = 5, per = "0s", ttl = "2m" }', "per"),
    ],
)
def test_bad_shield_after_is_a_config_error(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        section(f"shield_after = {value}\n")
    assert any("shield_after" in p and problem in p for p in caught.value.problems)


def test_udp_refusals_do_not_count(shield: table.Shield) -> None:
    """A datagram's source can be forged: it must not get a third party shielded."""
    rl = RateLimit(clock=Clock())
    rl.configure(section(LIMITED.replace("refusals = 3", "refusals = 1")))
    for _ in range(5):
        rl.l4gw_admit(make_flow(client="192.0.2.1", transport="udp"))
    assert shield.entries() == []


async def test_refusals_from_the_shared_backend_count(shield: table.Shield) -> None:
    """With ``backend = "redis"`` the limiter's answer is awaited; its refusals count too."""
    from l4gw_plugins.ratelimit.shield import ShieldAfter

    after = ShieldAfter(Clock())
    after.configure(section(LIMITED.replace("refusals = 3", "refusals = 2")))

    async def shared(flow: Any) -> Refusal | None:
        return Refusal("rate limited", rule="per_client")

    for _ in range(2):
        pending = after.admit(make_flow(client="192.0.2.7"), shared)
        assert not isinstance(pending, Refusal) and pending is not None
        refused = await pending  # type: ignore[misc]
        assert refused is not None and refused.rule == "per_client"
    entry = shield.lookup("192.0.2.7")
    assert entry is not None and entry.source == "ratelimit"
