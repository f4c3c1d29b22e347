"""The PROXY header the gateway writes to a backend, for a TCP connection and a UDP
session alike (gateway.decisions.proxy_header)."""

from __future__ import annotations

import pytest

from gateway import config as config_mod
from gateway import proxy_protocol
from gateway.decisions import proxy_header
from gateway.flow import Flow


def cluster(version: str, traceparent: bool = True) -> config_mod.ClusterConfig:
    raw = {
        "listener": [{"name": "l", "bind": "127.0.0.1:1"}],
        "route": [{"listener": "l", "cluster": "c"}],
        "cluster": {
            "c": {
                "endpoints": ["127.0.0.1:2"],
                "proxy_protocol": version,
                "proxy_protocol_traceparent": traceparent,
            }
        },
    }
    return config_mod.from_dict(raw, "<test>", {}).clusters["c"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_and_original_destination(version: str) -> None:
    flow = Flow(1, "l", "tcp", ("fd00::2", 40000), ("fd00:2::10", 443))
    flow.sni = "api.example.test"
    header = proxy_protocol.parse(proxy_header(cluster(version), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert (header.source, header.destination) == (("fd00::2", 40000), ("fd00:2::10", 443))
    assert header.authority == ("api.example.test" if version == "v2" else None)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mixed_families_say_unknown_instead_of_failing(version: str) -> None:
    # A plugin may rewrite the destination to another family (NAT64-like); no header can
    # carry both, so the backend is told to use the connection's own addresses.
    flow = Flow(1, "l", "tcp", ("198.18.0.2", 40000), ("fd00:2::10", 443))
    header = proxy_protocol.parse(proxy_header(cluster(version), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert header.source is None and header.destination is None
    assert header.command == ("PROXY" if version == "v1" else "LOCAL")


def test_udp_says_udp_with_both_addresses_and_traceparent():
    flow = Flow(1, "dns", "udp", ("198.18.0.2", 40000), ("198.18.2.53", 53))
    flow.traceparent_out = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    header = proxy_protocol.parse(proxy_header(cluster("v2"), flow) + b"payload")
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert header.transport == "udp"
    assert header.source == ("198.18.0.2", 40000)
    assert header.destination == ("198.18.2.53", 53)
    assert header.traceparent == flow.traceparent_out
    assert header.authority is None  # a UDP session has no SNI
    no_tp = proxy_protocol.parse(proxy_header(cluster("v2", traceparent=False), flow))
    assert isinstance(no_tp, proxy_protocol.ProxyHeader) and no_tp.traceparent is None


def test_tcp_says_tcp_with_the_traceparent_when_asked():
    flow = Flow(1, "l", "tcp", ("198.18.0.2", 40000), ("198.18.2.10", 443))
    flow.traceparent_out = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    header = proxy_protocol.parse(proxy_header(cluster("v2"), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert header.transport == "tcp" and header.traceparent == flow.traceparent_out
    no_tp = proxy_protocol.parse(proxy_header(cluster("v2", traceparent=False), flow))
    assert isinstance(no_tp, proxy_protocol.ProxyHeader) and no_tp.traceparent is None


def test_udp_with_mixed_families_is_local():
    flow = Flow(1, "dns", "udp", ("198.18.0.2", 40000), ("fd00:2::53", 53))
    header = proxy_protocol.parse(proxy_header(cluster("v2"), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert header.command == "LOCAL" and header.source is None
