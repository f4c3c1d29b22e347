"""Balancing algorithms on plain values: weights, loads, consistency (plugins/balance.py)."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import Endpoint
from l4gw_plugins.balance import (
    LOAD_AWARE,
    LeastConn,
    Maglev,
    RandomTwo,
    SmoothRoundRobin,
    maglev_table,
    make_balancer,
)

PICKS = 10_000
CLIENT = bytes([127, 0, 0, 1])


def endpoints(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 8000 + i, w) for i, w in enumerate(weights)]


def clients(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(32).to_bytes(4, "big") for _ in range(n)]


def assert_shares(counts: Counter[Endpoint], eps: list[Endpoint], tolerance: float) -> None:
    total = sum(counts.values())
    weight_sum = sum(e.weight for e in eps)
    for e in eps:
        want = e.weight / weight_sum
        got = counts[e] / total
        assert abs(got - want) <= tolerance, f"{e}: got {got:.4f}, want {want:.4f}"


def run(
    balancer: Callable[..., tuple[Endpoint, ...]],
    eps: list[Endpoint],
    keep_open: bool,
    picks: int = PICKS,
) -> Counter[Endpoint]:
    """Pick ``picks`` times; with ``keep_open`` every pick stays an active connection."""
    active: Counter[Endpoint] = Counter()
    counts: Counter[Endpoint] = Counter()
    for client in clients(picks):
        chosen = balancer(eps, active.__getitem__, client, 1)[0]
        counts[chosen] += 1
        if keep_open:
            active[chosen] += 1
    return counts


WEIGHTS = [(1, 1, 1), (3, 1), (5, 1, 1), (1, 2, 3, 4), (10, 1)]


@pytest.mark.parametrize("weights", WEIGHTS)
def test_round_robin_distribution(weights: tuple[int, ...]) -> None:
    eps = endpoints(*weights)
    counts = run(SmoothRoundRobin().order, eps, keep_open=False)
    assert_shares(counts, eps, tolerance=0.001)


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_round_robin_exact_over_one_cycle(weights: list[int]) -> None:
    """Over every window of sum(weights) picks each endpoint gets exactly its weight."""
    eps = endpoints(*weights)
    rr = SmoothRoundRobin()
    for _ in range(3):
        got = Counter(rr.pick(eps) for _ in range(sum(weights)))
        assert got == {e: e.weight for e in eps}


def test_round_robin_is_smooth() -> None:
    """Weight 5:1:1 interleaves (a a b a c a a), not a burst of five."""
    a, b, c = endpoints(5, 1, 1)
    rr = SmoothRoundRobin()
    assert [rr.pick([a, b, c]) for _ in range(7)] == [a, a, b, a, c, a, a]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("keep_open", [True, False])
def test_least_conn_distribution(weights: tuple[int, ...], keep_open: bool) -> None:
    eps = endpoints(*weights)
    counts = run(LeastConn().order, eps, keep_open=keep_open)
    assert_shares(counts, eps, tolerance=0.01)


def test_least_conn_prefers_the_least_loaded() -> None:
    a, b, c = endpoints(1, 1, 1)
    loads = {a: 5, b: 1, c: 3}
    assert LeastConn().order([a, b, c], loads.__getitem__, CLIENT, 3) == (b, c, a)
    # Relative to weight: 4 connections on weight 4 is lighter than 2 on weight 1.
    heavy, light = Endpoint("10.0.0.1", 1, 4), Endpoint("10.0.0.2", 1, 1)
    loads = {heavy: 4, light: 2}
    assert LeastConn().order([heavy, light], loads.__getitem__, CLIENT, 1) == (heavy,)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("keep_open", [True, False])
def test_random_two_distribution(weights: tuple[int, ...], keep_open: bool) -> None:
    eps = endpoints(*weights)
    counts = run(RandomTwo(random.Random(7)).order, eps, keep_open=keep_open)
    assert_shares(counts, eps, tolerance=0.03)


def test_random_two_avoids_a_busy_endpoint() -> None:
    eps = endpoints(1, 1, 1, 1)
    busy = eps[0]
    loads = {e: 0 for e in eps} | {busy: 1000}
    p2c = RandomTwo(random.Random(3))
    picks = Counter(p2c.order(eps, loads.__getitem__, CLIENT, 1)[0] for _ in range(2000))
    # The busy one wins only when drawn twice, which the draw forbids.
    assert picks[busy] == 0


@pytest.mark.parametrize("weights", WEIGHTS)
def test_maglev_distribution(weights: tuple[int, ...]) -> None:
    eps = endpoints(*weights)
    table = maglev_table(eps)
    slots = Counter(table)
    # Table slots are proportional to weights ...
    for i, e in enumerate(eps):
        assert abs(slots[i] / len(table) - e.weight / sum(weights)) < 0.001
    # ... and so are random clients.
    counts = run(Maglev(eps).order, eps, keep_open=False)
    assert_shares(counts, eps, tolerance=0.03)


def test_maglev_is_consistent_and_order_independent() -> None:
    eps = endpoints(1, 1, 1, 1, 1)
    a, b = Maglev(eps), Maglev(list(reversed(eps)))
    for client in clients(2000):
        assert a.lookup(client) == b.lookup(client)
        assert a.order(eps, lambda e: 0, client, 1) == a.order(eps, lambda e: 0, client, 1)


@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_maglev_moves_about_one_nth_when_an_endpoint_leaves(n: int) -> None:
    eps = endpoints(*([1] * n))
    before = Maglev(eps)
    gone = eps[n // 2]
    after = Maglev([e for e in eps if e != gone])
    sample = clients(PICKS, seed=n)
    moved = sum(before.lookup(c) != after.lookup(c) for c in sample) / len(sample)
    had_gone = sum(before.lookup(c) == gone for c in sample) / len(sample)
    # Everyone on the leaving endpoint must move; Maglev moves a few more.
    assert moved >= had_gone
    assert moved <= 1 / n * 1.25 + 0.01, f"moved {moved:.3f} of clients, 1/N = {1 / n:.3f}"


def test_maglev_unhealthy_endpoint_moves_only_its_clients() -> None:
    """Health does not rebuild the table: only the missing endpoint's clients move,
    and they spread over the others rather than piling onto one neighbour."""
    eps = endpoints(1, 1, 1, 1, 1)
    m = Maglev(eps)
    down = eps[2]
    up = [e for e in eps if e != down]
    spread: Counter[Endpoint] = Counter()
    for client in clients(PICKS, seed=5):
        home = m.lookup(client)
        now = m.order(up, lambda e: 0, client, 1)[0]
        if home != down:
            assert now == home
        else:
            spread[now] += 1
    assert set(spread) == set(up)
    assert min(spread.values()) > 0.15 * sum(spread.values())


@pytest.mark.parametrize("algorithm", ["round_robin", "least_conn", "random_two", "maglev"])
def test_order_gives_distinct_fallbacks(algorithm: str) -> None:
    eps = endpoints(3, 1, 2, 1)
    balancer = make_balancer(algorithm, eps)
    for client in clients(200):
        for count in (1, 2, 3, 4, 9):
            order = balancer.order(eps, lambda e: 0, client, count)
            assert len(order) == min(count, len(eps))
            assert len(set(order)) == len(order)
            assert set(order) <= set(eps)
    # One candidate is always itself.
    assert balancer.order(eps[1:2], lambda e: 0, CLIENT, 3) == (eps[1],)


def test_maglev_weight_zero_gets_nothing_and_ipv6_clients_hash() -> None:
    eps = [Endpoint("10.0.0.1", 1, 1), Endpoint("10.0.0.2", 1, 0)]
    assert set(maglev_table(eps)) == {0}
    v6 = ipaddress.ip_address("2001:db8::7").packed
    assert Maglev(eps).lookup(v6) == eps[0]
    assert maglev_table([Endpoint("10.0.0.1", 1, 0)]) == []


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError):
        make_balancer("nope", endpoints(1))


@pytest.mark.parametrize("algorithm", ["round_robin", "least_conn", "random_two", "maglev"])
def test_an_endpoint_listed_twice_is_tried_twice(algorithm: str) -> None:
    """A config may repeat an endpoint to retry it (the connect-budget test does)."""
    e = Endpoint("10.0.0.1", 80)
    balancer = make_balancer(algorithm, [e, e, e])
    assert balancer.order([e, e, e], lambda _: 0, CLIENT, 3) == (e, e, e)
    assert balancer.order([e, e, e], lambda _: 0, CLIENT, 2) == (e, e)


def _schema_algorithms() -> list[str]:
    """Every ``balance`` the config accepts, as its error message lists them."""
    from gateway.config import CLUSTER
    from gateway.schema import Invalid

    with pytest.raises(Invalid) as refused:
        CLUSTER["balance"].convert("?")
    return [
        part.strip(' "')
        for part in str(refused.value).split("one of ")[1].split(", got")[0].split(",")
    ]


@pytest.mark.parametrize("algorithm", _schema_algorithms())
def test_load_aware_names_exactly_the_balancers_that_read_the_load(algorithm: str) -> None:
    """The routing plugin counts connections only for LOAD_AWARE (its hooks are idle
    otherwise): an algorithm that reads the load and is missing there would always see
    0, one listed that never reads it would cost every connection the count."""
    endpoints = [Endpoint(f"10.0.0.{i}", 80) for i in range(1, 4)]
    read: list[Endpoint] = []

    def load(e: Endpoint) -> int:
        read.append(e)
        return 0

    make_balancer(algorithm, endpoints).order(endpoints, load, CLIENT, 3)
    assert bool(read) == (algorithm in LOAD_AWARE)
