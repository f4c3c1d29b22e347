"""The config's endpoint forms, ``[dns]``, ``endpoints_file`` and ``discovery``:
every form parsed, every refusal with its file, key path and problem."""

from __future__ import annotations

import tomllib

import pytest

from gateway import config as config_mod
from gateway.config import (
    ConfigError,
    DnsConfig,
    Endpoint,
    NamedEndpoint,
    SrvEndpoint,
    endpoint_spec,
)
from gateway.discovery import name_specs

HEAD = """
[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
listener = "public"
cluster = "api"
"""


def load(text: str, plugins: list[str] | None = None) -> config_mod.Config:
    return config_mod.from_dict(tomllib.loads(HEAD + text), "/etc/l4gw/gw.toml", {}, plugins)


def problems(text: str, plugins: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, plugins)
    assert str(info.value).startswith("/etc/l4gw/gw.toml: ")
    return info.value.problems


def test_every_endpoint_form() -> None:
    c = load(
        """
[cluster.api]
endpoints = [
  "10.0.0.7:8080",
  "[fd00::7]:8080",
  "API.Internal:8080",
  "localhost:9",
  "compose_service:80",
  { address = "api.internal.:8081", weight = 2 },
  { address = "[::1]:8082", weight = 0 },
  { srv = "_api._tcp.example.internal" },
]
"""
    )
    api = c.clusters["api"]
    assert api.endpoints == (
        Endpoint("10.0.0.7", 8080),
        Endpoint("fd00::7", 8080),
        Endpoint("::1", 8082, 0),
    )
    assert api.names == (
        NamedEndpoint("api.internal", 8080, 1),
        NamedEndpoint("localhost", 9, 1),
        NamedEndpoint("compose_service", 80, 1),
        NamedEndpoint("api.internal.", 8081, 2),
        SrvEndpoint("_api._tcp.example.internal"),
    )
    assert api.endpoints_file is None and api.discovery == ""
    assert c.dns == DnsConfig()
    assert [(cl, str(s)) for cl, s in name_specs(c)][:2] == [
        ("api", "api.internal:8080"),
        ("api", "localhost:9"),
    ]


def test_origin_and_source_take_no_part_in_equality() -> None:
    a = Endpoint("10.0.0.1", 80, origin="name", source="api:80")
    assert a == Endpoint("10.0.0.1", 80) and hash(a) == hash(Endpoint("10.0.0.1", 80))
    assert a != Endpoint("10.0.0.1", 80, priority=1)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("api", 'not an address: "api" (expected "1.2.3.4:80", "[::1]:80" or "name:80")'),
        (
            "10.0.0.300:80",
            'not an address: "10.0.0.300:80" (expected "1.2.3.4:80", "[::1]:80" or "name:80"; '
            '"10.0.0.300" is neither an IP address nor a DNS name)',
        ),
        (
            "-api:80",
            'not an address: "-api:80" (expected "1.2.3.4:80", "[::1]:80" or "name:80"; '
            '"-api" is neither an IP address nor a DNS name)',
        ),
        (
            "a..b:80",
            'not an address: "a..b:80" (expected "1.2.3.4:80", "[::1]:80" or "name:80"; '
            '"a..b" is neither an IP address nor a DNS name)',
        ),
        (f"{'a' * 64}.internal:80", "is neither an IP address nor a DNS name"),
        (f"{'a.' * 127}internal:80", "is neither an IP address nor a DNS name"),
        ("api:0", 'port 0 in "api:0": a backend needs the port it listens on'),
        ("api:65536", 'not a port in "api:65536": "65536"'),
        ("api:http", 'not a port in "api:http": "http"'),
        ("[::1]:x", 'not an address: "[::1]:x"'),
        ("::1:80", 'not an address: "::1:80"'),
    ],
)
def test_bad_endpoint_strings(value: str, problem: str) -> None:
    got = problems(f'[cluster.api]\nendpoints = ["10.0.0.1:80", "{value}"]\n')
    assert len(got) == 1
    assert got[0].startswith("cluster.api.endpoints[1]: ")
    assert problem in got[0]


def test_bad_endpoint_tables() -> None:
    got = problems(
        """
[cluster.api]
endpoints = [
  { address = "api:0" },
  { address = "api:80", weight = -1 },
  { srv = "bad name" },
  { srv = "_a._tcp.internal", weight = 2 },
  { address = "api:80", port = 2 },
  7,
]
"""
    )
    assert got == [
        'cluster.api.endpoints[0].address: port 0 in "api:0": a backend needs the port it '
        "listens on",
        "cluster.api.endpoints[1].weight: must be at least 0, got -1",
        'cluster.api.endpoints[2].srv: not a DNS name: "bad name" (labels of letters, digits '
        'and inner "-", at most 63 characters each)',
        "cluster.api.endpoints[3].weight: unknown key",
        "cluster.api.endpoints[4].port: unknown key",
        'cluster.api.endpoints[5]: expected "ip:port", "name:port", {address = "...", '
        'weight = N} or {srv = "..."}, got an integer',
    ]


def test_one_source_per_cluster() -> None:
    assert problems('[cluster.api]\nendpoints = ["10.0.0.1:80"]\nendpoints_file = "e.json"\n') == [
        "cluster.api.endpoints_file: give endpoints or endpoints_file, not both"
    ]
    assert problems('[cluster.api]\nendpoints = ["10.0.0.1:80"]\ndiscovery = "k8s"\n', ["k8s"]) == [
        "cluster.api: give one of endpoints, endpoints_file or discovery, not endpoints and discovery"
    ]
    assert problems('[cluster.api]\nendpoints_file = "e.json"\ndiscovery = "k8s"\n', ["k8s"]) == [
        "cluster.api: give one of endpoints, endpoints_file or discovery, not endpoints_file "
        "and discovery"
    ]
    assert problems('[cluster.api]\nconnect_timeout = "1s"\n') == [
        "cluster.api.endpoints: required (or endpoints_file, or discovery)"
    ]
    assert problems("[cluster.api]\nendpoints = []\n") == [
        "cluster.api.endpoints: needs at least 1 item"
    ]


def test_endpoints_file_is_relative_to_the_config_file() -> None:
    c = load('[cluster.api]\nendpoints_file = "api.json"\n')
    assert c.clusters["api"].endpoints_file == "/etc/l4gw/api.json"
    assert c.clusters["api"].endpoints == ()
    c = load('[cluster.api]\nendpoints_file = "/srv/api.json"\n')
    assert c.clusters["api"].endpoints_file == "/srv/api.json"


def test_discovery_names_a_loaded_plugin() -> None:
    assert (
        load('[cluster.api]\ndiscovery = "k8s"\n', ["routing", "k8s"]).clusters["api"].discovery
        == "k8s"
    )
    assert problems('[cluster.api]\ndiscovery = "k8s"\n', ["health", "routing"]) == [
        'cluster.api.discovery: no loaded plugin is named "k8s" (loaded: health, routing)'
    ]


def test_dns_section() -> None:
    c = load(
        """
[dns]
servers = ["127.0.0.1:5353", "10.0.0.53", "::1", "[fd00::53]:53"]
family = "ipv6"
min_ttl = "500ms"
max_ttl = "1m"
timeout = "1s"

[cluster.api]
endpoints = ["api:80"]
"""
    )
    assert c.dns == DnsConfig(
        servers=(("127.0.0.1", 5353), ("10.0.0.53", 53), ("::1", 53), ("fd00::53", 53)),
        family="ipv6",
        min_ttl=0.5,
        max_ttl=60.0,
        timeout=1.0,
    )
    assert problems(
        '[dns]\nfamily = "v4"\nretries = 2\n[cluster.api]\nendpoints = ["api:80"]\n'
    ) == [
        "dns.retries: unknown key",
        'dns.family: must be one of "any", "ipv4", "ipv6", got \'v4\'',
    ]
    got = problems(
        '[dns]\nservers = ["dns.google", "127.0.0.1:0"]\nmin_ttl = "10m"\nmax_ttl = "1m"\n'
        '[cluster.api]\nendpoints = ["api:80"]\n'
    )
    assert got == [
        'dns.servers[0]: not an address: "dns.google" (expected "1.2.3.4", "1.2.3.4:5353", '
        '"::1" or "[::1]:5353")',
        'dns.servers[1]: port 0 in "127.0.0.1:0"',
        "dns.max_ttl: shorter than min_ttl",
    ]


def test_endpoint_spec_is_what_files_use() -> None:
    assert endpoint_spec("api:80") == NamedEndpoint("api", 80, 1)
    assert endpoint_spec({"srv": "_x._udp.internal"}) == SrvEndpoint("_x._udp.internal")
    assert endpoint_spec({"address": "10.0.0.1:80", "weight": 4}) == Endpoint("10.0.0.1", 80, 4)
