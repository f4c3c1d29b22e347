"""The PROXY header the gateway writes to a backend (gateway.connection._proxy_header)."""

from __future__ import annotations

import pytest

from gateway import config as config_mod
from gateway import proxy_protocol
from gateway.connection import _proxy_header
from gateway.flow import Flow


def cluster(version: str) -> config_mod.ClusterConfig:
    raw = {
        "listener": [{"name": "l", "bind": "127.0.0.1:1"}],
        "route": [{"listener": "l", "cluster": "c"}],
        "cluster": {"c": {"endpoints": ["127.0.0.1:2"], "proxy_protocol": version}},
    }
    return config_mod.from_dict(raw, "<test>", {}).clusters["c"]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_client_and_original_destination(version: str) -> None:
    flow = Flow(1, "l", "tcp", ("fd00::2", 40000), ("fd00:2::10", 443))
    flow.sni = "api.example.test"
    header = proxy_protocol.parse(_proxy_header(cluster(version), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert (header.source, header.destination) == (("fd00::2", 40000), ("fd00:2::10", 443))
    assert header.authority == ("api.example.test" if version == "v2" else None)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mixed_families_say_unknown_instead_of_failing(version: str) -> None:
    # A plugin may rewrite the destination to another family (NAT64-like); no header can
    # carry both, so the backend is told to use the connection's own addresses.
    flow = Flow(1, "l", "tcp", ("198.18.0.2", 40000), ("fd00:2::10", 443))
    header = proxy_protocol.parse(_proxy_header(cluster(version), flow))
    assert isinstance(header, proxy_protocol.ProxyHeader)
    assert header.source is None and header.destination is None
    assert header.command == ("PROXY" if version == "v1" else "LOCAL")
