"""The process's own settings: open-file needs, identities, capabilities."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.config import ConfigError
from gateway.identity import IdentityError, resolve_identity
from gateway.linux import CAP_NET_ADMIN, CAP_NET_BIND_SERVICE
from gateway.process import fds_needed, needed_capabilities, unreadable_installation


def load(text: str) -> config_mod.Config:
    return config_mod.from_dict(tomllib.loads(text), "gw.toml", {})


BASE = """
[[listener]]
name = "a"
bind = "127.0.0.1:8080"
max_connections = 100
{listener}

[[route]]
listener = "a"
cluster = "c"

[cluster.c]
endpoints = ["127.0.0.1:9000"]
{cluster}
{more}
"""


def cfg(listener: str = "", cluster: str = "", more: str = "") -> config_mod.Config:
    return load(BASE.format(listener=listener, cluster=cluster, more=more))


def test_fds_needed_counts_two_per_connection_one_per_session():
    assert fds_needed(cfg()) == 64 + 1 + 200
    udp = cfg(more='[[listener]]\nname = "u"\nbind = "127.0.0.1:53"\nprotocol = "udp"\n'
                   "max_sessions = 50\n")
    assert fds_needed(udp) == 64 + 2 + 200 + 50


def test_needed_capabilities_follow_the_config():
    assert needed_capabilities(cfg()) == frozenset()
    assert needed_capabilities(cfg(listener="transparent = true")) == {CAP_NET_ADMIN}
    assert needed_capabilities(cfg(cluster='upstream_source = "client"')) == {CAP_NET_ADMIN}
    low = BASE.format(listener="", cluster="", more="").replace(":8080", ":443")
    assert needed_capabilities(load(low)) == {CAP_NET_BIND_SERVICE}
    assert needed_capabilities(cfg(more='[admin]\nbind = "127.0.0.1:99"')) == {
        CAP_NET_BIND_SERVICE}


def test_identities_by_name_number_and_default_group():
    nobody = resolve_identity("nobody", "")
    assert (nobody.uid, nobody.user) == (65534, "nobody")
    assert resolve_identity("65534", "").user == "nobody"
    bare = resolve_identity("10001", "")  # a bare uid, as container images use
    assert (bare.uid, bare.gid) == (10001, 10001)
    assert resolve_identity("nobody", "0").gid == 0
    with pytest.raises(IdentityError) as exc:
        resolve_identity("no-such-user-l4gw", "")
    assert exc.value.key == "user"
    with pytest.raises(IdentityError) as exc:
        resolve_identity("nobody", "no-such-group-l4gw")
    assert exc.value.key == "group"


@pytest.mark.parametrize(
    ("gateway", "problem"),
    [
        ('user = "no-such-user-l4gw"', 'gateway.user: no such user "no-such-user-l4gw"'),
        ('user = "nobody"\ngroup = "no-such-group-l4gw"',
         'gateway.group: no such group "no-such-group-l4gw"'),
        ('group = "nogroup"', "gateway.group: needs gateway.user"),
    ],
)
def test_check_refuses_unknown_users_and_groups(gateway, problem):
    with pytest.raises(ConfigError) as exc:
        cfg(more=f"[gateway]\n{gateway}")
    assert problem in exc.value.problems


def test_unreadable_installation_names_the_directory():
    nobody = resolve_identity("nobody", "")
    base = Path(tempfile.mkdtemp(prefix="l4gw-test-"))  # /tmp/...: anyone may enter
    try:
        base.chmod(0o755)
        private = base / "private"
        private.mkdir(mode=0o700)
        assert unreadable_installation(nobody, [str(private / "lib")]) == str(private)
        private.chmod(0o755)
        assert unreadable_installation(nobody, [str(private / "lib")]) is None
    finally:
        private.rmdir()
        base.rmdir()
