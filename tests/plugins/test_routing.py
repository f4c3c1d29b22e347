"""The routing plugin on plain values: matching, splits, health, panic, active counts."""

from __future__ import annotations

import tomllib
from collections import Counter

from gateway import Config, Endpoint, Flow
from gateway.config import from_dict
from gateway.plugin_manager import load
from gateway.testing import make_flow
from l4gw_plugins.health import CheckSpec, Health
from l4gw_plugins.routing import Routing

BASE = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"

[[route]]
name = "canary"
listener = "public"
ports = [443]
clusters = [{ cluster = "stable", weight = 9 }, { cluster = "next", weight = 1 }]

[[route]]
name = "main"
listener = "public"
cluster = "api"

[cluster.stable]
endpoints = ["10.0.0.1:80"]

[cluster.next]
endpoints = ["10.0.0.2:80"]

[cluster.api]
endpoints = ["10.0.1.1:80", { address = "10.0.1.2:80", weight = 3 }, "10.0.1.3:80"]
connect_attempts = 2
"""


def config(extra: str = "") -> Config:
    return from_dict(tomllib.loads(BASE + extra), "t", {})


def flow(n: int, port: int = 80, client: str = "192.0.2.1") -> Flow:
    return Flow(n, "public", "tcp", (client, 40000 + n), ("203.0.113.1", port))


def routing(extra: str = "") -> tuple[Routing, Health, Config]:
    health = Health()
    r = Routing(health)
    c = config(extra)
    r.configure(c)
    return r, health, c


def balanced(balance: str) -> tuple[Routing, Health, Config]:
    """:func:`routing` with cluster ``next`` balanced by ``balance`` (the rest round robin)."""
    raw = tomllib.loads(BASE)
    raw["cluster"]["next"]["balance"] = balance
    health = Health()
    r = Routing(health)
    c = from_dict(raw, "t", {})
    r.configure(c)
    return r, health, c


def test_canary_split_is_exact() -> None:
    r, _, _ = routing()
    clusters = Counter()
    for i in range(100):
        route = r.route(flow(i, port=443))
        assert route is not None and route.name == "canary"
        clusters[route.cluster.name] += 1
    assert clusters == {"stable": 90, "next": 10}


def test_weighted_round_robin_with_fallbacks() -> None:
    r, _, c = routing()
    firsts = Counter()
    for i in range(50):
        route = r.route(flow(i))
        assert route is not None and route.name == "main"
        assert len(route.endpoints) == 2 and len(set(route.endpoints)) == 2
        firsts[str(route.endpoints[0])] += 1
    assert firsts == {"10.0.1.1:80": 10, "10.0.1.2:80": 30, "10.0.1.3:80": 10}


def _down(health: Health, cluster: str, *addrs: str) -> None:
    spec = CheckSpec("tcp", 1, 1, 1, 1, b"", b"")
    for addr in addrs:
        host, port = addr.split(":")
        health.record((cluster, host, int(port)), spec, "connect: refused")


def test_unhealthy_endpoints_are_not_offered() -> None:
    r, health, _ = routing()
    _down(health, "api", "10.0.1.2:80")
    seen = set()
    for i in range(20):
        route = r.route(flow(i))
        assert route is not None
        seen.update(str(e) for e in route.endpoints)
    assert seen == {"10.0.1.1:80", "10.0.1.3:80"}


def test_no_healthy_refuses_or_panics() -> None:
    r, health, _ = routing()
    _down(health, "api", "10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80")
    f = flow(1)
    route = r.route(f)
    assert route is not None and route.endpoints == ()
    assert f.events[-1][0] == "no_healthy_endpoint"

    r, health, _ = routing('on_no_healthy = "panic"\n')
    _down(health, "api", "10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80")
    route = r.route(flow(2))
    assert route is not None and len(route.endpoints) == 2


def test_weight_zero_is_drained() -> None:
    extra = (
        '[cluster.drain]\nendpoints = [{ address = "10.0.2.1:80", weight = 0 }, "10.0.2.2:80"]\n'
    )
    raw = tomllib.loads(BASE + extra)
    raw["route"][1]["cluster"] = "drain"
    r = Routing(Health())
    r.configure(from_dict(raw, "t", {}))
    for i in range(10):
        route = r.route(flow(i))
        assert route is not None and [str(e) for e in route.endpoints] == ["10.0.2.2:80"]


def test_active_connections_steer_least_conn() -> None:
    raw = tomllib.loads(BASE)
    raw["cluster"]["api"]["balance"] = "least_conn"
    r = Routing(Health())
    r.configure(from_dict(raw, "t", {}))
    a, b, c = (Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80, 3), Endpoint("10.0.1.3", 80))
    flows = [flow(i) for i in range(5)]
    for f in flows:
        f.cluster = "api"
    # a: 2 open, b (weight 3): 3 open, c: 0 open -> c; close c's share -> ...
    for f, e in zip(flows, [a, a, b, b, b], strict=True):
        r.connected(f, e, None)
    route = r.route(flow(10))
    assert route is not None and route.endpoints[0] == c
    assert r.load_of("api", a) == 2 and r.load_of("api", b) == 3
    for f in flows:
        r.closed(f)
        r.closed(f)  # a second close of the same flow is ignored
    assert r.active == {}


def test_only_a_connected_attempt_counts_through_the_hook() -> None:
    """Driven as the core drives it (the hook table, every argument by name): a failed
    attempt counts nothing, the one that connected counts once, the close uncounts it."""
    r, _, c = balanced("least_conn")
    hooks = load(extra={"routing": r}, installed=False).configure(c)
    f = flow(1)
    f.cluster = "api"
    a, b = Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80, 3)
    hooks.observe("l4gw_connect_attempt", flow=f, endpoint=a, error="refused", seconds=0.1)
    hooks.observe("l4gw_connect_attempt", flow=f, endpoint=b, error=None, seconds=0.1)
    assert r.active == {("api", "10.0.1.2", 80): 1}
    hooks.closed(f)
    assert r.active == {}


def test_maglev_sticks_to_the_client() -> None:
    raw = tomllib.loads(BASE)
    raw["cluster"]["api"]["balance"] = "maglev"
    r = Routing(Health())
    r.configure(from_dict(raw, "t", {}))
    for client in ("192.0.2.1", "192.0.2.77", "2001:db8::1"):
        first = {r.route(flow(i, client=client)).endpoints[0] for i in range(20)}  # type: ignore[union-attr]
        assert len(first) == 1


def test_reload_keeps_unchanged_balancers() -> None:
    r, _, c = routing()
    before = dict(r.clusters)
    raw = tomllib.loads(BASE)
    raw["cluster"]["next"]["endpoints"] = ["10.0.0.3:80"]
    r.configure(from_dict(raw, "t", {}))
    assert r.clusters["api"] is before["api"]
    assert r.clusters["stable"] is before["stable"]
    assert r.clusters["next"] is not before["next"]


def test_no_match_abstains() -> None:
    r, _, _ = routing()
    f = Flow(1, "other-listener", "tcp", ("192.0.2.1", 1), ("203.0.113.1", 80))
    assert r.route(f) is None


ALPN = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"

[[route]]
name = "h2-api"
listener = "public"
sni = ["api.example.com"]
alpn = ["h2"]
cluster = "grpc"

[[route]]
name = "h2"
listener = "public"
alpn = ["h2", "h2c"]
cluster = "h2"

[[route]]
name = "legacy"
listener = "public"
alpn = ["é"]
cluster = "legacy"

[cluster.grpc]
endpoints = ["10.0.2.1:443"]
[cluster.h2]
endpoints = ["10.0.2.2:443"]
[cluster.legacy]
endpoints = ["10.0.2.3:443"]
"""


def alpn_route(sni: str | None, *alpn: str) -> str | None:
    r = Routing(Health())
    r.configure(from_dict(tomllib.loads(ALPN), "t", {}))
    route = r.route(make_flow(listener="public", sni=sni, alpn=alpn))
    return None if route is None else route.name


def test_alpn_matches_when_the_client_offers_one_of_the_protocols() -> None:
    assert alpn_route(None, "h2") == "h2"
    assert alpn_route(None, "http/1.1", "h2") == "h2"  # any offered one, in any order
    assert alpn_route(None, "h2c") == "h2"
    assert alpn_route(None, "http/1.1") is None
    assert alpn_route(None) is None  # no ALPN offered: no alpn route matches
    assert alpn_route(None, "H2") is None  # protocol names are bytes, compared exactly


def test_alpn_and_sni_must_both_hold() -> None:
    assert alpn_route("api.example.com", "h2", "http/1.1") == "h2-api"
    assert alpn_route("www.example.com", "h2") == "h2"  # SNI differs: the next route
    assert alpn_route("api.example.com", "http/1.1") is None  # ALPN differs
    assert alpn_route("api.example.com") is None


def test_a_non_ascii_alpn_name_matches_its_utf8_bytes() -> None:
    # The peek decodes each wire byte as one latin-1 character; the config's "é"
    # goes on the wire as its UTF-8 bytes C3 A9.
    assert alpn_route(None, b"\xc3\xa9".decode("latin-1")) == "legacy"
    assert alpn_route(None, "é") is None  # the single byte E9 is another name


def test_connections_are_counted_only_where_a_balancer_reads_the_counts() -> None:
    """Round robin and maglev read no load: the counting hooks are idle under such a
    configuration, so its connections cost neither hook. A cluster with least_conn or
    random_two anywhere in the configuration keeps them."""
    hooks = ("l4gw_connect_attempt", "l4gw_connection_closed")
    for balance, counted in (
        ("round_robin", False),
        ("maglev", False),
        ("least_conn", True),
        ("random_two", True),
    ):
        r, _, c = balanced(balance)
        table = load(extra={"routing": r}, installed=False).configure(c)
        assert [table.implements(h) for h in hooks] == [counted, counted], balance


def test_a_reload_never_counts_half_a_connection() -> None:
    """A connection counted under a load-aware configuration is uncounted at its close
    after a reload made the counting idle (it keeps the hooks it started with); one that
    starts under the idle configuration is not counted at all, and a reload back counts
    only the connections that start after it."""
    r, _, counting = balanced("least_conn")
    plugins = load(extra={"routing": r}, installed=False)
    before = plugins.configure(counting)
    a = Endpoint("10.0.1.1", 80)
    old, new = flow(1), flow(2)
    old.cluster = new.cluster = "api"
    before.observe("l4gw_connect_attempt", flow=old, endpoint=a, error=None, seconds=0.1)
    assert r.active == {("api", "10.0.1.1", 80): 1}

    idle = plugins.configure(config())  # round robin everywhere
    assert not idle.implements("l4gw_connect_attempt")
    idle.observe("l4gw_connect_attempt", flow=new, endpoint=a, error=None, seconds=0.1)
    assert r.active == {("api", "10.0.1.1", 80): 1}  # ``new`` is not counted
    before.closed(old)
    idle.closed(new)
    assert r.active == {}

    again = plugins.configure(counting)
    later = flow(3)
    later.cluster = "api"
    again.observe("l4gw_connect_attempt", flow=later, endpoint=a, error=None, seconds=0.1)
    assert r.load_of("api", a) == 1
    again.closed(later)
    assert r.active == {}
