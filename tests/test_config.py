"""Config validation: every problem listed by key path, ``l4gw check`` exit codes."""

from __future__ import annotations

import pytest

from gateway import config as config_mod
from gateway.config import ConfigError
from gateway.schema import parse_duration, size

from gwproc import l4gw

GOOD = """
[gateway]
drain_timeout = "30s"

[[listener]]
name = "public"
bind = "127.0.0.1:8080"
protocol = "tcp"
transparent = false
max_connections = 10000

[[listener]]
name = "v6"
bind = "[::1]:8443"

[[route]]
listener = "public"
cluster = "api"
destination = ["198.18.2.0/24"]
ports = [443]
sni = ["api.example.com", "*.example.org"]
source = ["198.18.1.0/24"]

[[route]]
listener = "v6"
clusters = [{cluster = "api", weight = 9}, {cluster = "canary", weight = 1}]

[cluster.api]
endpoints = ["127.0.0.1:9001", {address = "[::1]:9002", weight = 3}]
connect_timeout = "2s"
idle_timeout = "5m"

[cluster.canary]
endpoints = ["127.0.0.1:9003"]
"""


def problems(text: str) -> list[str]:
    import tomllib

    with pytest.raises(ConfigError) as info:
        config_mod.from_dict(tomllib.loads(text), "t.toml", {})
    return info.value.problems


def test_good_config_values():
    import tomllib

    cfg = config_mod.from_dict(tomllib.loads(GOOD), "t.toml", {})
    assert cfg.gateway.drain_timeout == 30
    assert cfg.listener("v6").host == "::1" and cfg.listener("v6").port == 8443
    api = cfg.clusters["api"]
    assert api.idle_timeout == 300 and api.connect_timeout == 2
    assert [str(e) for e in api.endpoints] == ["127.0.0.1:9001", "[::1]:9002"]
    assert api.endpoints[1].weight == 3
    assert cfg.routes[0].sni == ("api.example.com", "*.example.org")
    assert cfg.routes[1].clusters == (("api", 9), ("canary", 1))


@pytest.mark.parametrize(
    "edit,expected",
    [
        (('max_connections = 10000', 'max_connections = "many"'),
         "listener[0].max_connections: expected an integer, got a string"),
        (('drain_timeout = "30s"', 'drain_timeout = "30 parsecs"'),
         'gateway.drain_timeout: not a duration'),
        (('"127.0.0.1:9001"', '"127.0.0.1"'),
         'cluster.api.endpoints[0]: not an address: "127.0.0.1"'),
        (('weight = 3}', 'weight = 3, colour = "red"}'),
         "cluster.api.endpoints[1].colour: unknown key"),
        (('connect_timeout = "2s"', 'connect_timeout = "2s"\nconect_timeout = "1s"'),
         "cluster.api.conect_timeout: unknown key"),
        (('bind = "[::1]:8443"', 'bind = "[::1]:8443"\nname = "x"'),
         None),  # duplicate key: TOML itself refuses
        (('name = "v6"', 'name = "public"'), 'listener[1].name: duplicate "public"'),
        (('cluster = "api"\ndestination', 'cluster = "nope"\ndestination'),
         'route[0].cluster: no cluster named "nope"'),
        (('listener = "public"', 'listener = "ghost"'),
         'route[0].listener: no listener named "ghost"'),
        (('"198.18.2.0/24"', '"198.18.2.0/33"'), 'route[0].destination[0]: not a CIDR'),
        (('ports = [443]', 'ports = [0]'), "route[0].ports[0]: must be at least 1"),
        (('protocol = "tcp"', 'protocol = "sctp"'), 'listener[0].protocol: must be one of'),
        (('transparent = false', 'transparent = "no"'),
         "listener[0].transparent: expected true or false"),
        (('[gateway]', '[gateway]\n[bogus]'), "bogus: unknown section"),
        (('protocol = "tcp"', 'protocol = "udp"\nproxy_protocol = true'),
         "listener[0].proxy_protocol: a UDP listener cannot take PROXY headers"),
    ],
)
def test_each_problem_named_by_key_path(edit, expected):
    old, new = edit
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    if expected is None:
        import tomllib

        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(text)
        return
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_reported_at_once():
    text = GOOD.replace('"127.0.0.1:9001"', '"127.0.0.1"').replace('listener = "public"',
                                                                    'listener = "ghost"')
    text = text.replace('max_connections = 10000', 'max_connections = -1')
    found = problems(text)
    assert len(found) == 3, found


def test_a_config_without_listeners_is_refused():
    # On a reload an empty or truncated file would otherwise close every listener.
    assert problems("") == ["listener: at least one [[listener]] is required"]
    assert "listener: at least one [[listener]] is required" in problems('[gateway]\n')


def test_units():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1m30s") == 90
    assert size("64KiB") == 65536 and size("1MiB") == 1 << 20 and size(512) == 512


def test_check_cli_ok_and_errors(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    result = l4gw("check", "-c", str(good))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('"127.0.0.1:9001"', '"127.0.0.1"').replace('"2s"', "2"))
    result = l4gw("check", "-c", str(bad))
    assert result.returncode == 2
    assert f'{bad}: cluster.api.endpoints[0]: not an address: "127.0.0.1"' in result.stderr
    assert "cluster.api.connect_timeout: expected a duration" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    result = l4gw("check", "-c", str(broken))
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    result = l4gw("check", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_run_with_invalid_config_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('"5m"', '"five minutes"'))
    result = l4gw("run", "-c", str(bad))
    assert result.returncode == 2
    assert "cluster.api.idle_timeout: not a duration" in result.stderr


def test_version_and_help():
    assert l4gw("--version").stdout.startswith("l4gw ")
    for cmd in ("run", "check", "demo", "plugins"):
        result = l4gw(cmd, "--help")
        assert result.returncode == 0 and "usage: l4gw" in result.stdout
