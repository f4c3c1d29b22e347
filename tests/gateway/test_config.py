"""Config validation: every problem listed by key path, ``l4gw check`` exit codes."""

from __future__ import annotations

import dataclasses
import socket

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
alpn = ["h2", "http/1.1"]
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
    assert cfg.routes[0].alpn == ("h2", "http/1.1")
    assert cfg.routes[1].alpn == ()
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
        (('"http/1.1"]', '""]'), "route[0].alpn[1]: not an ALPN protocol name (1 to 255 bytes)"),
        (('"http/1.1"]', f'"{"x" * 256}"]'), "route[0].alpn[1]: not an ALPN protocol name"),
        (('"http/1.1"]', f'"{"é" * 128}"]'), "route[0].alpn[1]: not an ALPN protocol name"),
        (('alpn = ["h2", "http/1.1"]', 'alpn = "h2"'), "route[0].alpn: expected an array"),
        (('"http/1.1"]', '2]'), "route[0].alpn[1]: expected a string, got"),
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


def test_alpn_names_up_to_255_bytes():
    import tomllib

    longest = "x" * 255  # 255 bytes: the one-byte length's limit
    text = GOOD.replace('"http/1.1"]', f'"{longest}", "{"é" * 127}"]', 1)
    cfg = config_mod.from_dict(tomllib.loads(text), "t.toml", {})
    assert cfg.routes[0].alpn == ("h2", longest, "é" * 127)


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


# --- configs that cannot work are refused at check time --------------------------------------


def edited(*edits: tuple[str, str]) -> str:
    text = GOOD
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


GATEWAY_KEY = 'drain_timeout = "30s"'
LISTENER_KEY = "max_connections = 10000"
CLUSTER_KEY = 'idle_timeout = "5m"'


@pytest.mark.parametrize(
    "edits,expected",
    [
        ([(GATEWAY_KEY, "buffer_size = 0")], "gateway.buffer_size: must be at least 1KiB, got 0"),
        ([(GATEWAY_KEY, "buffer_size = 512")], "gateway.buffer_size: must be at least 1KiB"),
        ([(GATEWAY_KEY, 'buffer_size = "64GiB"')],
         'gateway.buffer_size: must be at most 64MiB, got "64GiB"'),
        ([(GATEWAY_KEY, 'buffer_size = "100GB"')],
         'gateway.buffer_size: must be at most 64MiB, got "100GB"'),
        ([(GATEWAY_KEY, f"buffer_size = {65 << 20}")],
         f"gateway.buffer_size: must be at most 64MiB, got {65 << 20}"),
        ([('"127.0.0.1:9001"', '"127.0.0.1:0"')],
         'cluster.api.endpoints[0]: port 0 in "127.0.0.1:0": a backend needs the port'),
        ([('"[::1]:9002"', '"[::1]:0"')], "cluster.api.endpoints[1].address: port 0"),
        ([(LISTENER_KEY, "peek_max = 0")], "listener[0].peek_max: must be at least 64, got 0"),
        ([(LISTENER_KEY, 'peek_max = "1MiB"')], "listener[0].peek_max: must be at most 64KiB"),
        ([(LISTENER_KEY, "peek_timeout = 0")], "listener[0].peek_timeout: must be longer than 0s"),
        ([(LISTENER_KEY, 'session_idle_timeout = "0ms"')],
         "listener[0].session_idle_timeout: must be longer than 0s"),
        ([('connect_timeout = "2s"', 'connect_timeout = "0s"')],
         "cluster.api.connect_timeout: must be longer than 0s"),
        ([(CLUSTER_KEY, "health_check = { interval = 0 }")],
         "cluster.api.health_check.interval: must be longer than 0s"),
        ([(CLUSTER_KEY, 'health_check = { timeout = "0s" }')],
         "cluster.api.health_check.timeout: must be longer than 0s"),
        ([(CLUSTER_KEY, "outlier = { ejection_time = 0 }")],
         "cluster.api.outlier.ejection_time: must be longer than 0s"),
        ([("[gateway]", "[telemetry]\nmetrics_interval = 0\n[gateway]")],
         "telemetry.metrics_interval: must be longer than 0s"),
        # PROXY headers are taken from trusted sources only: none listed refuses everyone.
        ([(LISTENER_KEY, "proxy_protocol = true")],
         "listener[0].proxy_protocol_trusted: required with proxy_protocol = true"),
        ([(GATEWAY_KEY, "workers = 2"), ('"127.0.0.1:8080"', '"127.0.0.1:0"')],
         "listener[0].bind: port 0 (any free port) cannot be shared by 2 workers"),
        ([("[gateway]", '[admin]\nbind = "0.0.0.0:9901"\n[gateway]')],
         'admin.bind: "0.0.0.0:9901" is not loopback: set admin.token'),
        ([("[gateway]", '[admin]\nbind = "[::]:9901"\n[gateway]')],
         'admin.bind: "[::]:9901" is not loopback'),
        ([("[gateway]", '[admin]\nbind = "198.18.0.1:9901"\ninsecure = false\n[gateway]')],
         'admin.bind: "198.18.0.1:9901" is not loopback'),
        ([("[gateway]", "[admin]\nmax_connections = 0\n[gateway]")],
         "admin.max_connections: must be at least 1"),
    ],
)
def test_a_config_that_cannot_work_is_refused(edits, expected):
    found = problems(edited(*edits))
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    "edits",
    [
        [(GATEWAY_KEY, 'buffer_size = "1KiB"')],
        [(GATEWAY_KEY, 'buffer_size = "64MiB"')],
        [(LISTENER_KEY, 'peek_max = 64\npeek_timeout = "1ms"')],
        [(LISTENER_KEY, 'proxy_protocol = true\nproxy_protocol_trusted = ["10.0.0.0/8"]')],
        # Port 0 binds any free port (the ready line and the admin log say which).
        [('"127.0.0.1:8080"', '"127.0.0.1:0"')],
        [("[gateway]", '[admin]\nbind = "127.0.0.2:0"\n[gateway]')],
        [("[gateway]", '[admin]\nbind = "[::1]:9901"\n[gateway]')],
        [("[gateway]", '[admin]\nbind = "0.0.0.0:9901"\ntoken = "t"\n[gateway]')],
        [("[gateway]", '[admin]\nbind = "0.0.0.0:9901"\ninsecure = true\n[gateway]')],
        [(CLUSTER_KEY, 'idle_timeout = 0\nconnect_budget = 0\nhealth_check = { interval = "1s" }')],
    ],
)
def test_edge_values_that_work_are_accepted(edits):
    import tomllib

    cfg = config_mod.from_dict(tomllib.loads(edited(*edits)), "t.toml", {})
    assert cfg.listeners


def test_admin_settings():
    import tomllib

    text = edited(("[gateway]", '[admin]\nbind = "0.0.0.0:0"\ninsecure = true\n[gateway]'))
    admin = config_mod.from_dict(tomllib.loads(text), "t.toml", {}).admin
    assert admin is not None
    assert (admin.host, admin.port, admin.token, admin.insecure) == ("0.0.0.0", 0, "", True)
    assert admin.max_connections == config_mod.ADMIN_MAX_CONNECTIONS == 16


def ratelimit_problems(url: str) -> list[str]:
    import tomllib

    from l4gw_plugins.ratelimit.plugin import SCHEMA

    text = GOOD + f'\n[plugin.ratelimit]\nbackend = "redis"\nredis_url = "{url}"\n'
    with pytest.raises(ConfigError) as info:
        config_mod.from_dict(tomllib.loads(text), "t.toml", {"ratelimit": SCHEMA})
    return info.value.problems


@pytest.mark.parametrize(
    "url,expected",
    [
        ("redis://gw:hunter2@127.0.0.1:99999/0", 'invalid port "99999" (1 to 65535)'),
        ("redis://:hunter2@[::1]:0/0", 'invalid port "0" (1 to 65535)'),
        ("redis://:hunter2@127.0.0.1:port/0", "invalid port (1 to 65535)"),
        ("redis://:hunter2@127.0.0.1:6379/zero", 'invalid db "zero" (a number)'),
        ("redis://:hunt/er2@127.0.0.1:6379/0", '"@" after the host: percent-encode "/"'),
        ("redis://:hunt#er2@127.0.0.1:6379/0", '"@" after the host: percent-encode "/"'),
        ("redis://:hunt[er2@127.0.0.1:6379/0", "the host is not an address or name"),
        ("redis://127.0.0.1:6379/0?password=hunter2", 'unexpected "?" or "#" part'),
        ("rediss://:hunter2@127.0.0.1:0/0", 'invalid port "0" (1 to 65535)'),
        ("http://:hunter2@127.0.0.1:6379/0", 'expected "redis://host[:port][/db]" (with'),
        ("hunter2@127.0.0.1:6379", 'expected "redis://host[:port][/db]" (with'),
    ],
)
def test_redis_url_refused_without_its_password(url, expected):
    found = ratelimit_problems(url)
    assert any(p.startswith(f"plugin.ratelimit.redis_url: {expected}") for p in found), found
    assert not any("hunter2" in p or "er2" in p for p in found), found


def test_redis_url_with_escaped_password_parses():
    from l4gw_plugins.ratelimit.buckets import parse_url

    a = parse_url("redis://gw:p%2Fa%23s%3Fs%40w:rd@[::1]:6380/2")
    assert (a.host, a.port, a.username, a.password, a.db) == ("::1", 6380, "gw", "p/a#s?s@w:rd", 2)
    a = parse_url("redis://u:p@ss@10.0.0.5/3")  # "@" needs no escape: the last one ends it
    assert (a.host, a.port, a.password, a.db) == ("10.0.0.5", 6379, "p@ss", 3)


# --- files that are not config files ---------------------------------------------------------


def test_check_refuses_a_file_that_is_not_utf8_in_one_line(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(GOOD.replace("[gateway]", "[gateway]\n# café").encode("latin-1"))
    offset = GOOD.replace("[gateway]", "[gateway]\n# caf").encode().index(b"# caf") + 5
    for command in ("check", "run"):
        result = l4gw(command, "-c", str(bad))
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"{bad}: not UTF-8 text (byte 0xe9 at offset {offset}, line 3)\n"


def test_check_refuses_a_directory_and_a_huge_file(tmp_path):
    result = l4gw("check", "-c", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == f"{tmp_path}: cannot read: Is a directory\n"
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as f:
        f.truncate(config_mod.MAX_FILE_SIZE + 1)
    result = l4gw("check", "-c", str(huge))
    assert result.returncode == 2
    assert result.stderr == f"{huge}: larger than 16MiB: not a config file\n"


def test_check_refuses_a_bad_redis_url_and_never_prints_its_password(tmp_path):
    bad = tmp_path / "redis.toml"
    bad.write_text(
        GOOD + '\n[plugin.ratelimit]\nredis_url = "redis://gw:s3cr3t-pw@127.0.0.1:99999/0"\n'
    )
    result = l4gw("check", "-c", str(bad))
    assert result.returncode == 2
    assert f'{bad}: plugin.ratelimit.redis_url: invalid port "99999"' in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("host", "family", "text"),
    [
        ("192.0.2.1", socket.AF_INET, "192.0.2.1:80"),
        ("2001:db8::1", socket.AF_INET6, "[2001:db8::1]:80"),
    ],
)
def test_an_endpoint_knows_its_family_and_text(host: str, family: int, text: str) -> None:
    """Made once, read per connection; not part of equality (nor is where it came from)."""
    endpoint = config_mod.Endpoint(host, 80)
    assert (endpoint.family, endpoint.text, str(endpoint)) == (family, text, text)
    assert endpoint == config_mod.Endpoint(host, 80, origin="name", source="api.internal")
    moved = dataclasses.replace(endpoint, port=81)
    assert moved.text == text[:-2] + "81"
