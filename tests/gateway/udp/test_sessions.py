"""UDP session decisions on plain values (gateway/udp/sessions.py), and the socket
helpers of gateway/udp/sockets.py on loopback."""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import config as config_mod
from gateway import plugin_manager
from gateway.config import Endpoint
from gateway.decisions import connect_upstream
from gateway.flow import Flow, Route
from gateway.linux import IP_ORIGDSTADDR, IPV6_ORIGDSTADDR
from gateway.relay.copy import CopyRelay
from gateway.runtime import Runtime
from gateway.udp.sessions import (
    DatagramQueue,
    SessionTable,
    UdpCounters,
    decode_sockaddr,
    encode_sockaddr,
    origdst_from_ancdata,
    pktinfo_destination,
)
from gateway.udp.sockets import UpstreamFailed, open_upstream


@dataclass(eq=False)
class S:
    last: float
    timeout: float


# --- the table ---------------------------------------------------------------------------


def test_cap_counts_and_refuses_new_sessions():
    table: SessionTable[str, S] = SessionTable(cap=2)
    assert table.add("a", S(0, 10))
    assert table.add("b", S(0, 10))
    assert not table.add("c", S(0, 10))
    assert not table.add("d", S(0, 10))
    assert table.over_cap == 2
    assert set(table.sessions) == {"a", "b"}


def test_a_lower_cap_keeps_sessions_and_stops_new_ones():
    table: SessionTable[str, S] = SessionTable(cap=3)
    for key in "abc":
        table.add(key, S(0, 10))
    table.cap = 1
    assert len(table) == 3
    assert not table.add("d", S(0, 10))
    table.remove("a", table.sessions["a"])
    table.remove("b", table.sessions["b"])
    assert not table.add("d", S(0, 10))  # still one left: at the cap
    table.remove("c", table.sessions["c"])
    assert table.add("d", S(0, 10))


def test_remove_only_the_session_the_key_maps_to():
    table: SessionTable[str, S] = SessionTable(cap=5)
    old, new = S(0, 10), S(1, 10)
    table.add("k", old)
    assert table.remove("k", old)
    table.add("k", new)
    assert not table.remove("k", old)
    assert table.sessions["k"] is new


def test_idle_sessions_expire_active_ones_do_not():
    table: SessionTable[str, S] = SessionTable(cap=10)
    idle, busy = S(0, 10), S(0, 10)
    table.add("idle", idle)
    table.add("busy", busy)
    assert table.next_deadline() == 10
    assert table.expired(9.9) == []
    busy.last = 7  # a datagram at t=7
    assert table.expired(10) == [("idle", idle)]
    assert table.next_deadline() == 17
    assert table.expired(16.9) == []
    assert table.expired(17) == [("busy", busy)]
    assert table.next_deadline() is None
    assert len(table) == 0


def test_removed_sessions_leave_no_deadline_behind():
    table: SessionTable[str, S] = SessionTable(cap=10)
    a, b = S(0, 5), S(0, 50)
    table.add("a", a)
    table.add("b", b)
    table.remove("a", a)
    assert table.next_deadline() == 50
    assert table.expired(49) == []


def test_a_key_reused_by_a_new_session_is_judged_by_the_new_one():
    table: SessionTable[str, S] = SessionTable(cap=10)
    old = S(0, 5)
    table.add("k", old)
    table.remove("k", old)
    new = S(4, 5)
    table.add("k", new)
    assert table.expired(5) == []  # old's entry is stale, new is due at 9
    assert table.expired(9) == [("k", new)]


def test_reschedule_after_a_shorter_timeout():
    table: SessionTable[str, S] = SessionTable(cap=10)
    s = S(0, 30)
    table.add("k", s)
    s.timeout = 5  # refused: held only briefly
    table.reschedule("k", s)
    assert table.next_deadline() == 5
    assert table.expired(5) == [("k", s)]


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.floats(0, 3, allow_nan=False)), min_size=1, max_size=60
    ),
    st.floats(0.5, 5),
)
def test_expiry_matches_a_simple_model(events, timeout):
    """Five sessions; each event advances the clock and touches one of them (or checks).
    A session is returned exactly when it has been idle for its whole timeout."""
    table: SessionTable[int, S] = SessionTable(cap=10)
    sessions = {i: S(0.0, timeout) for i in range(5)}
    for i, s in sessions.items():
        table.add(i, s)
    live = set(sessions)
    now = 0.0
    for who, step in events:
        now += step
        expected = {i for i in live if sessions[i].last + timeout <= now}
        got = {key for key, _ in table.expired(now)}
        assert got == expected
        live -= got
        if who in live:
            sessions[who].last = now
        deadline = table.next_deadline()
        if live:
            assert deadline is not None
            assert deadline <= min(sessions[i].last for i in live) + timeout
            assert deadline > now
        else:
            assert deadline is None


# --- queues and counters -----------------------------------------------------------------


def test_queue_caps_datagrams_and_bytes():
    q = DatagramQueue(max_datagrams=3, max_bytes=10)
    assert q.push(b"1234")
    assert q.push(b"5678")
    assert not q.push(b"abc")  # 11 bytes
    assert q.push(b"ab")
    assert not q.push(b"")  # 3 datagrams already
    assert len(q) == 3 and q.bytes == 10
    assert q.pop() == b"1234"
    assert q.peek() == b"5678"
    assert q.bytes == 6


def test_queue_always_takes_one_datagram_whatever_its_size():
    q = DatagramQueue(max_datagrams=3, max_bytes=10)
    assert q.push(bytes(65000))
    assert not q.push(b"x")


def test_counters_summary_names_every_counter():
    c = UdpCounters(sessions=3, over_cap=2)
    assert c.summary() == ("sessions=3 over_cap=2 queue_full=0 refused=0 oversized=0 send_errors=0")


# --- addresses ---------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@given(st.one_of(ipv4, ipv6), ports)
def test_sockaddr_round_trip(host, port):
    raw = encode_sockaddr(host, port)
    assert len(raw) == (28 if ":" in host else 16)
    got_host, got_port = decode_sockaddr(raw)
    assert ipaddress.ip_address(got_host) == ipaddress.ip_address(host)
    assert got_port == port


def test_sockaddr_of_an_ipv4_mapped_address_is_ipv4():
    assert decode_sockaddr(encode_sockaddr("::ffff:198.18.2.53", 53)) == ("198.18.2.53", 53)


@pytest.mark.parametrize("raw", [b"", b"\x02", bytes(4), b"\x01\x00" + bytes(14)])
def test_bad_sockaddrs_are_refused(raw):
    with pytest.raises(ValueError):
        decode_sockaddr(raw)


def test_origdst_is_found_among_ancillary_data():
    v4, v6 = encode_sockaddr("198.18.2.53", 53), encode_sockaddr("fd00:2::53", 53)
    other = (socket.IPPROTO_IP, socket.IP_TOS, b"\x00")
    assert origdst_from_ancdata([other, (socket.IPPROTO_IP, IP_ORIGDSTADDR, v4)]) == v4
    assert origdst_from_ancdata([(socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR, v6)]) == v6
    assert origdst_from_ancdata([other]) is None
    assert origdst_from_ancdata([]) is None


def test_pktinfo_gives_the_destination_and_the_reply_source():
    # in_pktinfo: ifindex 3, spec_dst 192.0.2.1 (the interface: a broadcast arrived), addr
    raw = (3).to_bytes(4, sys.byteorder) + bytes([192, 0, 2, 1]) + bytes([192, 0, 2, 255])
    dst, reply = pktinfo_destination(raw)
    assert dst == "192.0.2.255"
    assert reply == bytes(4) + bytes([192, 0, 2, 1]) + bytes(4)  # leave from spec_dst
    raw6 = socket.inet_pton(socket.AF_INET6, "fd00::53") + (7).to_bytes(4, sys.byteorder)
    dst6, reply6 = pktinfo_destination(raw6)
    assert dst6 == "fd00::53"
    assert reply6 == socket.inet_pton(socket.AF_INET6, "fd00::53") + bytes(4)
    with pytest.raises(ValueError):
        pktinfo_destination(bytes(16))


# --- socket helpers of gateway/udp/sockets.py -------------------------------------------------------


def test_upstream_socket_is_connected_and_non_blocking():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as backend:
        backend.bind(("127.0.0.1", 0))
        port = backend.getsockname()[1]
        up = open_upstream(Endpoint("127.0.0.1", port), None)
        try:
            assert up.getpeername() == ("127.0.0.1", port)
            assert not up.getblocking()
            up.send(b"ping")
            backend.settimeout(2)
            data, peer = backend.recvfrom(100)
            assert data == b"ping" and peer == up.getsockname()
        finally:
            up.close()


def test_upstream_refuses_mixed_families_for_a_transparent_source():
    with pytest.raises(UpstreamFailed, match="different IP versions"):
        open_upstream(Endpoint("::1", 53), ("127.0.0.1", 4000))


@pytest.mark.privileged
def test_a_failed_transparent_bind_names_the_address_as_the_config_does():
    # IPv6 in brackets (gateway.schema.format_address): "::1:5353" would read as an address.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as holder:
        holder.bind(("::1", 0))  # no SO_REUSEADDR: the transparent bind below must fail
        port = holder.getsockname()[1]
        with pytest.raises(UpstreamFailed, match=rf"^transparent bind to \[::1\]:{port}: "):
            open_upstream(Endpoint("::1", 53), ("::1", port))


async def test_a_failed_upstream_socket_is_a_failed_attempt_of_the_connect_loop():
    raw = {
        "listener": [{"name": "u", "bind": "127.0.0.1:1", "protocol": "udp"}],
        "route": [{"listener": "u", "cluster": "c"}],
        "cluster": {"c": {"endpoints": ["[::1]:53", "127.0.0.1:53"], "connect_attempts": 2}},
    }
    config = config_mod.from_dict(raw, "<test>", {})
    rt = Runtime(config, plugin_manager.load(installed=False), CopyRelay(65536), {})
    cluster = config.clusters["c"]

    async def attempt(endpoint: Endpoint, timeout: float, source: tuple[str, int] | None):
        # An IPv4 client's address as the source of an IPv6 endpoint: UpstreamFailed.
        v6 = endpoint.family == socket.AF_INET6
        return open_upstream(endpoint, ("127.0.0.1", 4000) if v6 else None)

    flow = Flow(1, "u", "udp", ("127.0.0.1", 4000), ("127.0.0.1", 1))
    up = await connect_upstream(rt, Route("r", cluster, cluster.endpoints), flow, attempt, None)
    assert isinstance(up, socket.socket)  # the next endpoint was tried
    up.close()
    assert flow.endpoint == "127.0.0.1:53"

    flow = Flow(2, "u", "udp", ("127.0.0.1", 4000), ("127.0.0.1", 1))
    only_v6 = Route("r", cluster, cluster.endpoints[:1])
    assert await connect_upstream(rt, only_v6, flow, attempt, None) == "connect_failed"
    assert (
        flow.error == "[::1]:53: client 127.0.0.1 and endpoint [::1]:53 are different IP versions"
    )
