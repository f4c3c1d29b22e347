"""How a plugin author tests a plugin, with l4gw's public API alone (``gateway`` and
``gateway.testing``): pure lookups; then the plugin driven by l4gw's own plugin
loader, config validation and decisions (no process, no sockets); then end to end,
inside a real ``l4gw run``."""

from __future__ import annotations

import errno
import ipaddress
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator

import l4gw_geo_deny
import pytest
import trio

from gateway import CloseReason, Flow, hookimpl
from gateway.testing import (
    ConfigError,
    GatewayProcess,
    load_plugins,
    make_config,
    make_flow,
    run_decisions,
)

SECTION = """
[plugin.geo_deny]
deny = ["198.18.7.0/24", "2001:db8:bad::/48", "10.0.0.0/8"]
allow = ["198.18.7.10/32"]
"""


# --- pure ------------------------------------------------------------------------------


def test_most_specific_network_wins() -> None:
    nets = l4gw_geo_deny.NetworkSet(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "::/0")
    )
    assert str(nets.match(ipaddress.ip_address("10.1.2.3"))) == "10.1.0.0/16"
    assert str(nets.match(ipaddress.ip_address("10.2.2.3"))) == "10.0.0.0/8"
    assert nets.match(ipaddress.ip_address("11.0.0.1")) is None
    assert str(nets.match(ipaddress.ip_address("2001:db8::1"))) == "::/0"


# --- in process: l4gw's loader, validation and decisions -------------------------------


def test_deny_allow() -> None:
    geo = l4gw_geo_deny.GeoDeny()
    make_config(SECTION, load_plugins({"geo_deny": geo}))  # validated, then l4gw_configure
    assert str(geo.rules.denied_by("198.18.7.9")) == "198.18.7.0/24"
    assert geo.rules.denied_by("198.18.7.10") is None
    assert str(geo.rules.denied_by("2001:db8:bad:1::5")) == "2001:db8:bad::/48"
    assert geo.rules.denied_by("192.0.2.1") is None


def test_config_errors_have_key_paths() -> None:
    plugins = load_plugins({"geo_deny": l4gw_geo_deny.GeoDeny()})
    with pytest.raises(ConfigError) as err:
        make_config(SECTION.replace('"10.0.0.0/8"', '"ten"'), plugins)
    assert err.value.problems == ['plugin.geo_deny.deny[2]: not a CIDR: "ten"']


def test_refuses_before_the_router_is_asked() -> None:
    geo = l4gw_geo_deny.GeoDeny()
    plugins = load_plugins({"geo_deny": geo})
    config = make_config(SECTION, plugins)

    refused = trio.run(run_decisions, plugins, config, make_flow(client="198.18.7.77"))
    assert refused.close_reason == CloseReason.REFUSED
    assert (refused.refused_by, refused.refused_rule) == ("geo_deny", "deny 198.18.7.0/24")
    assert refused.error == "client 198.18.7.77 is in 198.18.7.0/24"
    assert geo.refused == 1

    # Let through: the next decision is the route, and with no router loaded no one routes.
    passed = trio.run(run_decisions, plugins, config, make_flow(client="192.0.2.1"))
    assert passed.close_reason == CloseReason.NO_ROUTE


def test_loaded_by_entry_point_among_the_installed_plugins() -> None:
    plugins = load_plugins()  # every installed plugin, by entry point, as `l4gw run` loads them
    config = make_config(
        SECTION
        + """
[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:9"]
""",
        plugins,
    )
    flow = make_flow(client="198.18.7.9")
    refused = trio.run(run_decisions, plugins, config, flow)
    assert refused.refused_by == "geo_deny"
    assert flow.attributes["geo_deny.denied_by"] == "198.18.7.0/24"

    passed = trio.run(run_decisions, plugins, config, make_flow(client="198.18.7.10"))
    assert passed.ok and passed.route is not None and passed.route.cluster.name == "api"


def test_another_plugins_refusal_wins_when_it_runs_first() -> None:
    """Plugin order is pluggy's: the last registered first, ``tryfirst`` before all."""

    class Blocklist:
        @hookimpl(tryfirst=True)
        def l4gw_admit(self, flow: Flow) -> None:
            flow.set_attribute("blocklist.checked", True)

    geo = l4gw_geo_deny.GeoDeny()
    plugins = load_plugins({"geo_deny": geo, "blocklist": Blocklist()})
    config = make_config(SECTION, plugins)
    flow = make_flow(client="10.1.2.3")
    assert trio.run(run_decisions, plugins, config, flow).refused_by == "geo_deny"
    assert flow.attributes["blocklist.checked"] is True


# --- end to end: a real `l4gw run` (the gateway_process fixture, conftest.py) ----------


@pytest.fixture
def echo_backend() -> Iterator[int]:
    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def echo_from(source: str, port: int) -> bytes | None:
    """What comes back from the gateway for b"ping" sent from ``source``; None when
    the connection is reset."""
    try:
        # The reset can even beat connect() back to this thread: the handshake completes
        # in the kernel, the gateway accepts and resets, and connect() then reports it.
        conn = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    except ConnectionResetError:
        return None
    with conn as s:
        try:
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            return got
        except ConnectionResetError:
            return None
        except OSError as exc:
            # The reset can arrive before the shutdown: the socket is already closed.
            if exc.errno == errno.ENOTCONN:
                return None
            raise


@pytest.mark.timeout(60)
def test_in_l4gw_run(gateway_process: Callable[..., GatewayProcess], echo_backend: int) -> None:
    gw = gateway_process(f"""
[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[route]]
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{echo_backend}"]

[plugin.geo_deny]
deny = ["127.0.0.2/32"]
reset = true
""")
    _, port = gw.address("public")
    assert echo_from("127.0.0.1", port) == b"ping"
    assert echo_from("127.0.0.2", port) is None  # refused with a reset
    gw.wait_log(r"client=127\.0\.0\.2:\d+ .* refused by=geo_deny/deny 127\.0\.0\.2/32")
