"""The shield program's verdicts on hand-built frames (``BPF_PROG_TEST_RUN``), both
entry points, and the map operations of :class:`KernelShield` (real BPF, no attach)."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterator

import pytest

from gateway.linux import CAP_NET_ADMIN
from gateway.shield import frames
from gateway.shield.frames import ACK, IPPROTO_TCP, IPPROTO_UDP, SYN
from gateway.shield.kernel import (
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    XDP_DROP,
    XDP_PASS,
    KernelShield,
    ShieldUnavailable,
)
from gateway.shield.keys import UnshieldableError, key_of, network_of

pytestmark = pytest.mark.privileged

CAP_BPF = 39  # linux/capability.h

PORT = 8443
UDP_PORT = 5353
OTHER_PORT = 22
LISTED4, UNLISTED4 = "198.18.0.7", "198.18.9.7"
LISTED6, UNLISTED6 = "fd00:bad::7", "fd00:900d::7"
DST4, DST6 = "198.18.2.10", "fd00:2::10"
net = ipaddress.ip_network


@pytest.fixture(scope="module")
def loaded() -> Iterator[KernelShield]:
    with KernelShield.load([], "auto", 1024, [PORT], [UDP_PORT]) as shield:
        yield shield


@pytest.fixture
def shield(loaded: KernelShield) -> Iterator[KernelShield]:
    loaded.put(net("198.18.0.0/24"), 0)
    loaded.put(net("fd00:bad::/48"), 0)
    loaded.set_ports([PORT], [UDP_PORT])
    yield loaded
    for network, _, _ in list(loaded.entries()):
        loaded.delete(network)
    loaded.reset_counters()


@pytest.fixture(params=["xdp", "tc"])
def verdict(request: pytest.FixtureRequest, shield: KernelShield) -> object:
    """verdict(frame) -> "drop" | "pass", through one entry point."""
    xdp = request.param == "xdp"
    names = (
        {XDP_DROP: "drop", XDP_PASS: "pass"}
        if xdp
        else {TC_ACT_SHOT: "drop", TC_ACT_UNSPEC: "pass"}
    )

    def run(frame: bytes) -> str:
        return names[shield.test_run(frame, xdp=xdp)]

    return run


def v4(src: str, l4: bytes, proto: int = IPPROTO_TCP, **kw: object) -> bytes:
    return frames.ethernet(frames.ETH_P_IP, frames.ipv4(src, DST4, proto, l4, **kw))  # type: ignore[arg-type]


def v6(src: str, payload: bytes, nexthdr: int = IPPROTO_TCP) -> bytes:
    return frames.ethernet(frames.ETH_P_IPV6, frames.ipv6(src, DST6, nexthdr, payload))


def ext_chain(kinds: list[int], last: int, payload: bytes) -> tuple[int, bytes]:
    """(first next-header, bytes) of extension headers ``kinds`` then ``payload`` (``last``)."""
    out = b""
    for i, kind in enumerate(kinds):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else last
        out += frames.ipv6_ext(kind, nxt)
    return (kinds[0] if kinds else last), out + payload


def test_syn_from_listed_sources_is_dropped_unlisted_passes(verdict, shield: KernelShield) -> None:
    assert verdict(frames.tcp_frame(LISTED4, DST4, PORT)) == "drop"
    assert verdict(frames.tcp_frame(UNLISTED4, DST4, PORT)) == "pass"
    assert verdict(frames.tcp_frame(LISTED6, DST6, PORT)) == "drop"
    assert verdict(frames.tcp_frame(UNLISTED6, DST6, PORT)) == "pass"
    assert shield.drops(net("198.18.0.0/24")) == 1
    assert shield.drops(net("fd00:bad::/48")) == 1
    assert shield.counters() == (2, 2)


def test_established_tcp_and_other_ports_always_pass(verdict) -> None:
    for flags in (ACK, SYN | ACK, ACK | 0x01, 0x04):  # ACK, SYN-ACK, FIN-ACK, RST
        assert verdict(frames.tcp_frame(LISTED4, DST4, PORT, flags)) == "pass", flags
        assert verdict(frames.tcp_frame(LISTED6, DST6, PORT, flags)) == "pass", flags
    # SSH and every port the gateway does not listen on or intercept.
    assert verdict(frames.tcp_frame(LISTED4, DST4, OTHER_PORT)) == "pass"
    assert verdict(frames.tcp_frame(LISTED6, DST6, OTHER_PORT)) == "pass"


def test_udp_to_a_listener_port_is_dropped_for_listed_sources(verdict) -> None:
    assert verdict(v4(LISTED4, frames.udp(5000, UDP_PORT), IPPROTO_UDP)) == "drop"
    assert verdict(v6(LISTED6, frames.udp(5000, UDP_PORT), IPPROTO_UDP)) == "drop"
    assert verdict(v4(UNLISTED4, frames.udp(5000, UDP_PORT), IPPROTO_UDP)) == "pass"
    assert verdict(v4(LISTED4, frames.udp(5000, UDP_PORT + 1), IPPROTO_UDP)) == "pass"
    # A TCP port is not a UDP port, and the other way round.
    assert verdict(v4(LISTED4, frames.udp(5000, PORT), IPPROTO_UDP)) == "pass"
    assert verdict(frames.tcp_frame(LISTED4, DST4, UDP_PORT)) == "pass"


def test_ports_follow_set_ports(verdict, shield: KernelShield) -> None:
    shield.set_ports([OTHER_PORT + 1], [])
    assert verdict(frames.tcp_frame(LISTED4, DST4, PORT)) == "pass"
    assert verdict(frames.tcp_frame(LISTED4, DST4, OTHER_PORT + 1)) == "drop"
    assert verdict(v4(LISTED4, frames.udp(5000, UDP_PORT), IPPROTO_UDP)) == "pass"


def test_ipv4_options_are_skipped(verdict) -> None:
    options = bytes([1, 1, 1, 1, 1, 1, 1, 0])  # NOPs, EOL: ihl = 7
    assert verdict(v4(LISTED4, frames.tcp(1, PORT, SYN), options=options)) == "drop"
    assert verdict(v4(LISTED4, frames.tcp(1, PORT, ACK), options=options)) == "pass"
    assert verdict(v4(UNLISTED4, frames.tcp(1, PORT, SYN), options=options)) == "pass"


def test_ipv4_fragments(verdict) -> None:
    # A non-first fragment has no TCP header: pass (its first fragment is dropped).
    assert verdict(v4(LISTED4, frames.tcp(1, PORT, SYN), frag_offset=3)) == "pass"
    assert verdict(v4(LISTED4, frames.tcp(1, PORT, SYN), frag_offset=0)) == "drop"


def test_ipv6_extension_headers_are_walked(verdict) -> None:
    syn, ack = frames.tcp(1, PORT, SYN), frames.tcp(1, PORT, ACK)
    for kinds in ([0], [0, 60, 43], [51], [0, 44, 60]):
        first, chain = ext_chain(kinds, IPPROTO_TCP, syn)
        assert verdict(v6(LISTED6, chain, first)) == "drop", kinds
        assert verdict(v6(UNLISTED6, chain, first)) == "pass", kinds
        first, chain = ext_chain(kinds, IPPROTO_TCP, ack)
        assert verdict(v6(LISTED6, chain, first)) == "pass", kinds


def test_ipv6_extension_chain_past_the_limit_fails_closed_for_listed(verdict) -> None:
    # Linux answers a SYN behind 8 Destination Options headers (shield.md §4).
    first, chain = ext_chain([60] * 8, IPPROTO_TCP, frames.tcp(1, PORT, SYN))
    assert verdict(v6(LISTED6, chain, first)) == "drop"
    assert verdict(v6(UNLISTED6, chain, first)) == "pass"
    first, chain = ext_chain([60] * 6, IPPROTO_TCP, frames.tcp(1, PORT, SYN))
    assert verdict(v6(LISTED6, chain, first)) == "drop"
    first, chain = ext_chain([60] * 6, IPPROTO_TCP, frames.tcp(1, PORT, ACK))
    assert verdict(v6(LISTED6, chain, first)) == "pass"
    # ICMPv6 (neighbour discovery among it) behind the longest chain walked: not ours.
    first, chain = ext_chain([60] * 6, 58, bytes([135, 0, 0, 0]) + bytes(20))
    assert verdict(v6(LISTED6, chain, first)) == "pass"
    # ESP hides L4: a listed source fails closed.
    assert verdict(v6(LISTED6, bytes(16), 50)) == "drop"
    assert verdict(v6(UNLISTED6, bytes(16), 50)) == "pass"


def test_ipv6_fragments(verdict) -> None:
    syn = frames.tcp(1, PORT, SYN)
    later = frames.ipv6_ext(44, IPPROTO_TCP, frag_offset=5) + syn
    assert verdict(v6(LISTED6, later, 44)) == "pass"
    first = frames.ipv6_ext(44, IPPROTO_TCP, frag_offset=0) + syn
    assert verdict(v6(LISTED6, first, 44)) == "drop"


def test_truncated_frames(verdict, shield: KernelShield) -> None:
    full = frames.tcp_frame(LISTED4, DST4, PORT)
    # The TCP header cut short: the source is known and listed, so drop (fail closed).
    assert verdict(full[:-4]) == "drop"
    assert verdict(frames.tcp_frame(UNLISTED4, DST4, PORT)[:-4]) == "pass"
    # The IP header cut short: no source to look up. (The kernel refuses to test-run
    # such a frame through a tc program: EINVAL.)
    assert shield.test_run(full[: 14 + 10], xdp=True) == XDP_PASS
    assert shield.test_run(full[:14], xdp=True) == XDP_PASS


def test_vlan_tags_in_xdp(shield: KernelShield) -> None:
    packet = frames.ipv4(LISTED4, DST4, IPPROTO_TCP, frames.tcp(1, PORT, SYN))
    for vlans in ((7,), (7, 8)):
        frame = frames.ethernet(frames.ETH_P_IP, packet, vlans)
        assert shield.test_run(frame, xdp=True) == XDP_DROP, vlans
        unlisted = frames.ipv4(UNLISTED4, DST4, IPPROTO_TCP, frames.tcp(1, PORT, SYN))
        assert (
            shield.test_run(frames.ethernet(frames.ETH_P_IP, unlisted, vlans), xdp=True) == XDP_PASS
        )


def test_expiry_deadline(verdict, shield: KernelShield) -> None:
    host = net(f"{LISTED4}/32")
    shield.put(host, time.monotonic_ns() + 10_000_000_000)
    assert verdict(frames.tcp_frame(LISTED4, DST4, PORT)) == "drop"
    assert shield.drops(host) == 1
    # Past its deadline the entry no longer drops (and a re-put keeps the count).
    shield.put(host, time.monotonic_ns() - 1)
    assert verdict(frames.tcp_frame(LISTED4, DST4, PORT)) == "pass"
    assert shield.drops(host) == 1


def test_exact_entries_are_told_from_covering_ones(shield: KernelShield) -> None:
    inner = net("198.18.0.128/25")
    shield.put(inner, 0)
    assert {str(n) for n, _, _ in shield.entries()} == {
        "198.18.0.0/24", "198.18.0.128/25", "fd00:bad::/48",
    }  # fmt: skip
    shield.delete(inner)
    # The /24 still covers the /25, but it is not the /25's entry.
    assert shield.deadline(inner) is None and shield.drops(inner) == 0
    assert shield.deadline(net("198.18.0.0/24")) == 0


def test_keys() -> None:
    assert key_of(net("198.18.0.0/24")) == key_of(net("::ffff:198.18.0.0/120"))
    assert network_of(key_of(net("198.18.0.0/24"))) == net("198.18.0.0/24")
    assert network_of(key_of(net("fd00:bad::/48"))) == net("fd00:bad::/48")
    for covering in ("::/64", "::/0", "::/80"):
        with pytest.raises(UnshieldableError, match="every IPv4 source"):
            key_of(net(covering))


def test_map_updates_work_after_the_privilege_drop(shield: KernelShield) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # no capabilities left
            shield.put(net("198.18.5.0/24"), 0)
            code = 0 if shield.drops(net("198.18.5.0/24")) == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shield.deadline(net("198.18.5.0/24")) == 0


def test_a_missing_object_is_one_line(tmp_path) -> None:
    with pytest.raises(ShieldUnavailable, match=r"^shield: cannot open .*missing\.o"):
        KernelShield.load([], "auto", 16, [], [], path=str(tmp_path / "missing.o"))


def test_a_missing_interface_is_one_line() -> None:
    with pytest.raises(ShieldUnavailable, match="cannot attach to l4gw-nonesuch"):
        KernelShield.load(["l4gw-nonesuch"], "auto", 16, [PORT], [])


def test_a_verifier_refusal_is_one_line_with_its_reason() -> None:
    """Without CAP_PERFMON the verifier refuses the parser (shield.md §6): the line says so."""
    import gateway.process
    from gateway.identity import resolve_identity

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            # Everything is imported already: the child reads nothing of the installation.
            gateway.process.unreadable_installation = lambda *a, **k: None  # type: ignore[assignment]
            nobody = resolve_identity("nobody", "")
            gateway.process.drop_privileges(nobody, frozenset({CAP_NET_ADMIN, CAP_BPF}))
            try:
                KernelShield.open(16).close()
                os.write(write, b"loaded")
            except ShieldUnavailable as exc:
                os.write(write, str(exc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "\n" not in message
    assert message.startswith("shield: the verifier refused the program (")
    assert "prohibited for !root" in message and "CAP_PERFMON" in message
