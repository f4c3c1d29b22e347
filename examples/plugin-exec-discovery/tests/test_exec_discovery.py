"""The example discovery plugin: its parser, and a real ``l4gw run`` whose cluster
follows what a real command prints."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from l4gw_exec_discovery import ParseError, parse

from gateway import Endpoint
from gateway.testing import GatewayProcess, load_plugins, make_config


def test_parse_forms_and_problems() -> None:
    assert parse(b'["10.0.0.7:8080", {"address": "[::1]:81", "weight": 2, "priority": 1}]') == (
        Endpoint("10.0.0.7", 8080),
        Endpoint("::1", 81, 2, 1),
    )
    for bad, why in [
        (b"[", "not JSON"),
        (b"{}", "expected a JSON list"),
        (b'["api:80"]', "[0]: not an address"),
        (b'[{"address": "10.0.0.1:80", "weight": -1}]', "[0]: weight"),
    ]:
        with pytest.raises(ParseError, match=why.replace("[", r"\[")):
            parse(bad)


def test_the_section_is_checked_with_key_paths() -> None:
    from gateway.testing import ConfigError

    with pytest.raises(ConfigError) as info:
        make_config('[plugin.exec_discovery]\ncommands = [{ cluster = "api" }]\n', load_plugins())
    assert info.value.problems == ["plugin.exec_discovery.commands[0].command: required"]


def test_a_cluster_follows_the_command(
    tmp_path: Path, gateway_process: Callable[..., GatewayProcess]
) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    port = backend.getsockname()[1]
    listing = tmp_path / "endpoints.json"
    listing.write_text(json.dumps([f"127.0.0.1:{port}"]))
    gw = gateway_process(
        f"""
[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
discovery = "exec_discovery"

[plugin.exec_discovery]
interval = "100ms"
commands = [{{ cluster = "api", command = ["cat", "{listing}"] }}]
"""
    )
    gw.wait_log(r"discovery: cluster api: 1 endpoints, added 127\.0\.0\.1:", 10)
    with socket.create_connection(gw.address(), timeout=5) as client:
        conn, _ = backend.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    listing.write_text("not json")
    gw.wait_log(r"cluster api: .*not JSON.*keeping the last good set", 10)
    backend.close()
    os.unlink(listing)
