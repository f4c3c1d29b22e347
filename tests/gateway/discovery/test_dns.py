"""The DNS resolver and ``follow`` against a real dnsmasq (tests/support/dnsmasq.py).

Every query goes to a dns_server this test started on 127.0.0.1 (or, for SERVFAIL, which
dns_server cannot be made to answer for a local name, to a scripted responder on a real
UDP socket); a name /etc/hosts knows goes to the system resolver, which answers it
from the file.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import dns.message
import dns.rcode
import pytest
import trio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway.config import DnsConfig, Endpoint, NamedEndpoint, SrvEndpoint
from gateway.discovery.dns import (
    SYSTEM_REFRESH,
    ResolveError,
    Resolver,
    follow,
    hosts_names,
)

from dnsmasq import Dnsmasq, Srv
from dnsmasq import dns_server as dns_server  # the fixture

pytestmark = pytest.mark.timeout(60)


def resolver(server: Dnsmasq | str, **kw: Any) -> Resolver:
    where = server.server if isinstance(server, Dnsmasq) else server
    host, _, port = where.rpartition(":")
    settings = {"min_ttl": 1.0, "max_ttl": 300.0, "timeout": 1.0, **kw}
    return Resolver(DnsConfig(servers=((host.strip("[]"), int(port)),), **settings))


def hosts_of(found: tuple[Endpoint, ...]) -> list[str]:
    return [e.host for e in found]


# --- records --------------------------------------------------------------------


async def test_a_records_become_one_endpoint_each_with_the_names_weight(dns_server):
    name = dns_server.name("api")
    dns_server.set_hosts({name: ["127.0.0.12", "127.0.0.11"]})
    found, ttl = await resolver(dns_server).endpoints(NamedEndpoint(name, 8080, 3))
    assert found == (Endpoint("127.0.0.11", 8080, 3), Endpoint("127.0.0.12", 8080, 3))
    assert {(e.origin, e.source) for e in found} == {("name", name)}
    assert ttl == 1.0  # dnsmasq's --local-ttl=1, at min_ttl
    # dnsmasq rotates its answers; the set is sorted, so a new order is no change.
    again, _ = await resolver(dns_server).endpoints(NamedEndpoint(name, 8080, 3))
    assert again == found


@pytest.mark.parametrize(
    ("family", "want"),
    [
        ("any", ["127.0.0.11", "::1", "fd00::5"]),
        ("ipv4", ["127.0.0.11"]),
        ("ipv6", ["::1", "fd00::5"]),
    ],
)
async def test_family_selects_a_aaaa_or_both(dns_server, family, want):
    name = dns_server.name("dual")
    dns_server.set_hosts({name: ["127.0.0.11", "::1", "fd00::5"]})
    found, _ = await resolver(dns_server, family=family).endpoints(NamedEndpoint(name, 80, 1))
    assert hosts_of(found) == want


async def test_a_name_with_only_a_records_under_any_and_ipv6(dns_server):
    name = dns_server.name("v4only")
    dns_server.set_hosts({name: ["127.0.0.11"]})
    found, _ = await resolver(dns_server, family="any").endpoints(NamedEndpoint(name, 80, 1))
    assert hosts_of(found) == ["127.0.0.11"]  # AAAA NODATA is an answer, not a failure
    with pytest.raises(ResolveError) as err:
        await resolver(dns_server, family="ipv6").endpoints(NamedEndpoint(name, 80, 1))
    assert err.value.kind == "noanswer"


async def test_srv_targets_ports_priorities_and_weights(dns_server):
    srv = dns_server.name("_api._tcp")
    t1, t2, gone = dns_server.name("t1"), dns_server.name("t2"), dns_server.name("gone")
    dns_server.set_hosts({t1: ["127.0.0.21"], t2: ["127.0.0.22", "127.0.0.23"]})
    dns_server.set_srv(
        [
            Srv(srv, t2, 8002, priority=20, weight=40),
            Srv(srv, t1, 8001, priority=10, weight=60),
            Srv(srv, gone, 8003, priority=10, weight=5),  # NXDOMAIN target: left out
        ]
    )
    found, ttl = await resolver(dns_server).endpoints(SrvEndpoint(srv))
    assert [(e.host, e.port, e.weight, e.priority) for e in found] == [
        ("127.0.0.21", 8001, 60, 10),
        ("127.0.0.22", 8002, 40, 20),
        ("127.0.0.23", 8002, 40, 20),
    ]
    assert {(e.origin, e.source) for e in found} == {("srv", srv)}
    assert ttl == 1.0


async def test_srv_weights_all_zero_mean_equal_shares(dns_server):
    srv = dns_server.name("_zero._tcp")
    t1, t2 = dns_server.name("z1"), dns_server.name("z2")
    dns_server.set_hosts({t1: ["127.0.0.31"], t2: ["127.0.0.32"]})
    dns_server.set_srv([Srv(srv, t1, 81, 0, 0), Srv(srv, t2, 82, 0, 0)])
    found, _ = await resolver(dns_server).endpoints(SrvEndpoint(srv))
    assert [e.weight for e in found] == [1, 1]


async def test_ttl_is_clamped_into_min_and_max(tmp_path):
    long = Dnsmasq(tmp_path / "long", ttl=600)
    long.set_hosts({long.name("api"): ["127.0.0.11"]})
    long.start()
    try:
        spec = NamedEndpoint(long.name("api"), 80, 1)
        _, ttl = await resolver(long, max_ttl=5.0).endpoints(spec)
        assert ttl == 5.0
        _, ttl = await resolver(long, max_ttl=3600.0).endpoints(spec)
        assert 595 < ttl <= 600  # the record's own TTL, as answer.expiration tells it
    finally:
        long.stop()
    short = Dnsmasq(tmp_path / "short", ttl=1)
    short.set_hosts({short.name("api"): ["127.0.0.11"]})
    short.start()
    try:
        _, ttl = await resolver(short, min_ttl=4.0).endpoints(
            NamedEndpoint(short.name("api"), 80, 1)
        )
        assert ttl == 4.0
    finally:
        short.stop()


# --- failures ---------------------------------------------------------------------


async def servfail_server(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A DNS server on a real UDP socket that answers every query SERVFAIL."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, peer = await sock.recvfrom(4096)
            reply = dns.message.make_response(dns.message.from_wire(data))
            reply.set_rcode(dns.rcode.SERVFAIL)
            await sock.sendto(reply.to_wire(), peer)


async def test_errors_are_mapped_to_kinds(dns_server, nursery):
    r = resolver(dns_server, timeout=0.3)

    async def kind(spec: NamedEndpoint | SrvEndpoint, via: Resolver = r) -> str:
        with pytest.raises(ResolveError) as err:
            await via.endpoints(spec)
        return err.value.kind

    assert await kind(NamedEndpoint(dns_server.name("missing"), 80, 1)) == "nxdomain"
    assert await kind(SrvEndpoint(dns_server.name("_none._tcp"))) == "nxdomain"
    # Outside its local domain dnsmasq has no upstream: REFUSED.
    assert await kind(NamedEndpoint("api.elsewhere.invalid", 80, 1)) == "refused"
    port = await nursery.start(servfail_server)
    assert await kind(NamedEndpoint("api.l4gw.test", 80, 1), resolver(f"127.0.0.1:{port}")) == (
        "servfail"
    )
    dns_server.stop()  # nothing answers on its port any more
    started = time.monotonic()
    assert await kind(NamedEndpoint(dns_server.name("api"), 80, 1)) == "timeout"
    assert time.monotonic() - started < 0.3 + 0.5  # the [dns] timeout bounds the query


async def test_a_query_cancels_cleanly(dns_server):
    dns_server.stop()
    r = resolver(dns_server, timeout=5.0)
    started = time.monotonic()
    with trio.move_on_after(0.2) as scope:
        await r.endpoints(NamedEndpoint(dns_server.name("api"), 80, 1))
    assert scope.cancelled_caught
    assert time.monotonic() - started < 0.5


async def test_a_name_only_etc_hosts_knows_is_answered_by_the_system_resolver(dns_server):
    # dnsmasq serves no /etc/hosts (--no-hosts) and refuses names outside its domain.
    r = resolver(dns_server, family="ipv4")
    found, ttl = await r.endpoints(NamedEndpoint("localhost", 9000, 2))
    assert found == (Endpoint("127.0.0.1", 9000, 2),)
    assert ttl == SYSTEM_REFRESH
    assert dns_server.queries("localhost") == 0  # never asked of the DNS server


def test_hosts_names_reads_names_and_aliases():
    text = "127.0.0.1 localhost\n# 10.0.0.1 commented\n10.0.0.2 Api.Internal. api  # x\n\n::1 ip6-localhost\n"
    assert hosts_names(text) == {"localhost", "api.internal", "api", "ip6-localhost"}


async def test_no_dns_server_at_all_falls_back_to_the_system_resolver(tmp_path):
    empty = tmp_path / "resolv.conf"
    empty.write_text("# no nameserver\n")
    r = Resolver(DnsConfig(family="ipv4"), resolv_conf=str(empty), hosts_path=str(tmp_path / "x"))
    found, _ = await r.endpoints(NamedEndpoint("localhost", 80, 1))
    assert hosts_of(found) == ["127.0.0.1"]
    assert r.servers == ()


async def test_empty_servers_read_the_systems_with_their_search_list(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver ::1\nsearch svc.cluster.local\n")
    r = Resolver(DnsConfig(), resolv_conf=str(conf))
    await r.configure()  # read in a thread, not at construction on the event loop
    assert r.servers == ("127.0.0.53:53", "[::1]:53")
    assert r.search


# --- following ----------------------------------------------------------------------


class Changes:
    def __init__(self) -> None:
        self.sets: list[tuple[Endpoint, ...]] = []
        self.event = trio.Event()

    def __call__(self, found: tuple[Endpoint, ...]) -> None:
        self.sets.append(found)
        self.event.set()

    async def next(self, timeout: float) -> tuple[Endpoint, ...]:
        with trio.fail_after(timeout):
            await self.event.wait()
        self.event = trio.Event()
        return self.sets[-1]


async def test_follow_delivers_changes_and_keeps_the_last_good_set(dns_server, nursery, caplog):
    caplog.set_level(logging.INFO, "l4gw.dns")
    name = dns_server.name("api")
    dns_server.set_hosts({name: ["127.0.0.11"]})
    reader = InMemoryMetricReader()
    r = Resolver(
        DnsConfig(servers=(("127.0.0.1", dns_server.port),), min_ttl=1.0, max_ttl=2.0, timeout=0.3),
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    changes = Changes()
    nursery.start_soon(lambda: follow(r, NamedEndpoint(name, 80, 1), changes, cluster="api"))
    assert hosts_of(await changes.next(2)) == ["127.0.0.11"]

    dns_server.set_hosts({name: ["127.0.0.12"]})
    changed = time.monotonic()
    assert hosts_of(await changes.next(1 + 1)) == ["127.0.0.12"]  # within the TTL plus a second
    assert time.monotonic() - changed <= 2

    dns_server.stop()
    await trio.sleep(3.5)  # several TTLs, a few failed refreshes
    assert len(changes.sets) == 2, "a failure replaced the last good set"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one per outage
    assert f"cluster api: {name}:80" in warnings[0]
    assert "timeout" in warnings[0] and "keeping 1 addresses" in warnings[0]

    dns_server.set_hosts({name: ["127.0.0.13"]})
    dns_server.start()
    assert hosts_of(await changes.next(2 + 0.3 + 1)) == ["127.0.0.13"]  # backoff capped at max_ttl
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("resolves again" in m for m in infos), infos

    points = {
        (m.name, tuple(sorted(p.attributes.items())), p.value)
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }
    failures = [v for n, a, v in points if n == "l4gw.dns.failures"]
    timeouts = [
        v
        for n, a, v in points
        if n == "l4gw.dns.resolutions" and ("l4gw.dns.result", "timeout") in a
    ]
    oks = [
        v for n, a, v in points if n == "l4gw.dns.resolutions" and ("l4gw.dns.result", "ok") in a
    ]
    assert failures and failures[0] >= 2 and timeouts == failures
    assert oks and oks[0] >= 3


async def test_follow_a_name_that_never_resolved(dns_server, nursery, caplog):
    caplog.set_level(logging.INFO, "l4gw.dns")
    name = dns_server.name("later")
    r = resolver(dns_server, max_ttl=1.0)
    changes = Changes()
    nursery.start_soon(lambda: follow(r, NamedEndpoint(name, 80, 1), changes))
    assert await changes.next(2) == ()  # its cluster learns it is empty, once
    await trio.sleep(1.5)
    assert changes.sets == [()]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nxdomain" in warnings[0], warnings
    dns_server.set_hosts({name: ["127.0.0.14"]})
    assert hosts_of(await changes.next(2)) == ["127.0.0.14"]


def test_backoff_is_bounded():
    r = Resolver(DnsConfig(servers=(("127.0.0.1", 53),), min_ttl=1.0, max_ttl=300.0))
    assert [r.backoff(n) for n in (1, 2, 3, 5, 6, 40)] == [1, 2, 4, 16, 30, 30]
    short = Resolver(DnsConfig(servers=(("127.0.0.1", 53),), min_ttl=1.0, max_ttl=2.0))
    assert short.backoff(10) == 2.0
    slow = Resolver(DnsConfig(servers=(("127.0.0.1", 53),), min_ttl=60.0, max_ttl=300.0))
    assert slow.backoff(1) == 60.0 and slow.backoff(5) == 60.0
