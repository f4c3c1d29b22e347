"""Routing and health over endpoint sets that change at run time (gateway.discovery).

Carry-over for addresses that stay (health, outlier and least-conn state),
balancers rebuilt only for the cluster that changed, SRV priority groups, and a
cluster with no endpoint at all (``no_endpoint``).
"""

from __future__ import annotations

import socket

import pytest
import trio

from gateway import CloseReason, Config, Endpoint, Flow, Route
from gateway.discovery import Registry
from gateway.testing import load_plugins, make_config
from l4gw_plugins.health import Health
from l4gw_plugins.routing import Routing

pytestmark = pytest.mark.timeout(30)

A, B, C = Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80), Endpoint("10.0.1.3", 80)

TEXT = """
[[route]]
listener = "public"
ports = [80]
cluster = "api"

[[route]]
listener = "public"
cluster = "web"

[cluster.api]
discovery = "k8s"
balance = "{balance}"
connect_attempts = 3
{extra}

[cluster.web]
endpoints = ["10.0.9.1:80"]
balance = "maglev"
"""


def setup(balance: str = "round_robin", extra: str = "") -> tuple[Registry, Routing, Health]:
    registry = Registry()
    health = Health(registry=registry)
    routing = Routing(health, registry=registry)
    config: Config = make_config(TEXT.format(balance=balance, extra=extra))
    registry.configure(config)
    routing.configure(config)
    health.l4gw_configure(config)
    return registry, routing, health


def flow(n: int, port: int = 80) -> Flow:
    return Flow(n, "public", "tcp", (f"192.0.2.{n % 200 + 1}", 40000 + n), ("203.0.113.1", port))


def routed(routing: Routing, n: int = 1) -> Route:
    route = routing.route(flow(n))
    assert route is not None
    return route


def test_new_connections_follow_the_published_set() -> None:
    registry, routing, _ = setup()
    assert routed(routing).endpoints == ()  # nothing published yet
    registry.publish("api", [A, B], source="k8s")
    assert {routed(routing, i).endpoints[0] for i in range(4)} == {A, B}
    registry.publish("api", [C], source="k8s")
    assert {routed(routing, i).endpoints[0] for i in range(4)} == {C}


def test_least_conn_counts_carry_over_for_addresses_that_stay() -> None:
    registry, routing, _ = setup("least_conn")
    registry.publish("api", [A, B], source="k8s")
    flows = [flow(i) for i in range(3)]
    for f in flows:
        f.cluster = "api"
        routing.connected(f, A, None)
    registry.publish("api", [A, B, C], source="k8s")
    assert routing.load_of("api", A) == 3
    # A is loaded: B and C (0 each) take the next two, never A.
    assert {routed(routing, 10 + i).endpoints[0] for i in range(2)} == {B, C}
    # A leaves while its connections are open: they close normally, counts drain.
    registry.publish("api", [B, C], source="k8s")
    for f in flows:
        routing.closed(f)
    assert routing.active == {}


def test_only_the_changed_cluster_gets_new_balancers() -> None:
    registry, routing, _ = setup("maglev")
    registry.publish("api", [A, B], source="k8s")
    web, api = routing.clusters["web"], routing.clusters["api"]
    registry.publish("api", [A, B], source="k8s")  # the same set: nothing rebuilt
    assert routing.clusters["api"] is api
    registry.publish("api", [A, B, C], source="k8s")
    assert routing.clusters["web"] is web
    assert routing.clusters["api"] is not api
    # The new Maglev table holds the new member.
    seen = {routed(routing, i).endpoints[0] for i in range(200)}
    assert seen == {A, B, C}


def test_health_and_outlier_state_carry_over_and_checks_follow_the_set() -> None:
    registry, _, health = setup(
        extra='[cluster.api.health_check]\ninterval = "1s"\n'
        '[cluster.api.outlier]\nconsecutive_failures = 1\nejection_time = "60s"\n'
    )
    registry.publish("api", [A, B], source="k8s")
    assert set(health._wanted) == {("api", "10.0.1.1", 80), ("api", "10.0.1.2", 80)}
    spec = health._wanted[("api", "10.0.1.1", 80)]
    health.record(("api", "10.0.1.1", 80), spec, "connect: Connection refused")
    health.connect_result("api", B, "Connection refused")
    assert health.state_of("api", A) == "unhealthy"
    assert health.state_of("api", B) == "ejected"
    # A and B stay (B now with another weight), C arrives: state kept, C unchecked.
    registry.publish("api", [A, Endpoint("10.0.1.2", 80, 5), C], source="k8s")
    assert health.state_of("api", A) == "unhealthy"
    assert health.state_of("api", B) == "ejected"
    assert health.state_of("api", C) == "unchecked"
    assert ("api", "10.0.1.3", 80) in health._wanted
    # A leaves: its check and state go; back later, it starts over.
    registry.publish("api", [B, C], source="k8s")
    assert ("api", "10.0.1.1", 80) not in health._wanted
    assert ("api", "10.0.1.1", 80) not in health.states
    registry.publish("api", [A, B, C], source="k8s")
    assert health.state_of("api", A) == "unchecked"
    assert health.filter("api", [A, B, C]) == [A, C]


def test_srv_priorities_offer_the_lowest_group_first_and_the_rest_as_fallback() -> None:
    registry, routing, health = setup(extra="[cluster.api.outlier]\nconsecutive_failures = 1\n")
    p10 = [Endpoint("10.0.1.1", 80, 1, 10), Endpoint("10.0.1.2", 80, 1, 10)]
    p20 = [Endpoint("10.0.2.1", 80, 1, 20), Endpoint("10.0.2.2", 80, 1, 20)]
    registry.publish("api", [*p20, *p10], source="k8s")
    for i in range(6):
        got = routed(routing, i).endpoints
        # Both of priority 10 (balanced between them), then one of 20 as a fallback.
        assert set(got[:2]) == set(p10) and got[2] in p20
    assert {routed(routing, i).endpoints[0] for i in range(4)} == set(p10)
    # Priority 10 gone (ejected): 20 takes new connections.
    for e in p10:
        health.connect_result("api", e, "Connection refused")
    got = routed(routing).endpoints
    assert set(got) == set(p20)


def test_a_cluster_without_endpoints_closes_as_no_endpoint() -> None:
    from gateway.decisions import connect_upstream
    from gateway.relay.copy import CopyRelay
    from gateway.runtime import Runtime

    config = make_config(TEXT.format(balance="round_robin", extra=""))
    rt = Runtime(config, load_plugins(), CopyRelay(65536), {})
    f = flow(1)

    async def never(endpoint: Endpoint, timeout: float, source: object) -> socket.socket:
        raise AssertionError("no attempt without endpoints")

    async def main() -> object:
        return await connect_upstream(rt, Route("r", config.clusters["api"], ()), f, never, None)

    assert trio.run(main) == CloseReason.NO_ENDPOINT
    assert f.error == "cluster api has no endpoints"
    assert CloseReason.NO_ENDPOINT in CloseReason.FAILURES


async def test_checks_run_for_addresses_that_arrive_and_stop_for_those_that_leave() -> None:
    registry, _, health = setup(extra='[cluster.api.health_check]\ninterval = "50ms"\n')
    up = socket.create_server(("127.0.0.1", 0))
    with up:
        live = Endpoint("127.0.0.1", up.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await health.l4gw_startup(
                make_config(TEXT.format(balance="round_robin", extra="")), nursery
            )
            registry.publish("api", [live], source="k8s")
            with trio.fail_after(5):
                while health.state_of("api", live) != "healthy":
                    await trio.sleep(0.02)
            checker = health._checkers[("api", live.host, live.port)]
            registry.publish("api", [], source="k8s")
            assert checker.scope.cancel_called
            assert not health._checkers
            nursery.cancel_scope.cancel()
