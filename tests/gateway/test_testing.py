"""gateway/testing.py: what a plugin's tests use, checked against what the core does.

In process: plugins loaded through the core's loader, configs validated by the
core's validator, decisions taken by the core's decision stage (so the same
failure policies and the same record on the flow). End to end: a real
``l4gw run`` process, and the pytest fixture that starts it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from gateway import CloseReason, Config, Field, Flow, Refusal, Route, hookimpl, schema
from gateway.testing import (
    DEFAULT_LISTENER,
    ConfigError,
    GatewayProcess,
    PluginError,
    close_flow,
    load_plugins,
    make_config,
    make_flow,
    run_decisions,
)

# The fixture, as a plugin author's conftest.py loads it.
pytest_plugins = ["gateway.testing"]

ROUTED = """
[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:9", "127.0.0.1:10"]
"""


class Recorder:
    """Records every hook call; refuses what it is told to."""

    def __init__(
        self,
        admit: Refusal | None = None,
        routed: Refusal | None = None,
        fail_in: str = "",
        async_hooks: bool = False,
    ) -> None:
        self.admit, self.routed, self.fail_in, self.async_hooks = (
            admit,
            routed,
            fail_in,
            async_hooks,
        )
        self.calls: list[str] = []
        self.configured: list[Config] = []

    @hookimpl
    def l4gw_config_sections(self) -> dict[str, Any]:
        return {"recorder": {"tag": Field(schema.string, "-", "a value to read back")}}

    @hookimpl
    def l4gw_configure(self, config: Config) -> None:
        if self.fail_in == "configure":
            raise RuntimeError("configure fails")
        self.configured.append(config)

    @hookimpl
    def l4gw_connection_opened(self, flow: Flow) -> None:
        self.calls.append("opened")

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Any:
        self.calls.append("admit")
        if self.fail_in == "admit":
            raise RuntimeError("admit fails")
        return self._answer(self.admit)

    @hookimpl
    def l4gw_routed(self, flow: Flow, route: Route) -> Any:
        self.calls.append(f"routed {route.name}")
        return self._answer(self.routed)

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.calls.append(f"closed {flow.close_reason}")

    def _answer(self, value: Refusal | None) -> Any:
        if not self.async_hooks:
            return value

        async def later() -> Refusal | None:
            await trio.lowlevel.checkpoint()
            return value

        return later()


class Router:
    """Routes every flow to cluster ``api``, or raises."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    @hookimpl
    def l4gw_route(self, flow: Flow, config: Config) -> Route:
        if self.fail:
            raise RuntimeError("route fails")
        cluster = config.clusters["api"]
        return Route("mine", cluster, cluster.endpoints)


# --- load_plugins -----------------------------------------------------------------------


def test_load_plugins_installed_by_default() -> None:
    names = {i.name for i in load_plugins().infos}
    assert {"routing", "health", "ratelimit", "accesslog"} <= names


def test_load_plugins_given_objects_alone() -> None:
    plugins = load_plugins({"rec": Recorder()})
    assert [i.name for i in plugins.infos] == ["rec"]


def test_load_plugins_given_objects_among_the_installed_replace_their_namesake() -> None:
    mine = Router()
    plugins = load_plugins({"routing": mine}, installed=True, disabled=["ratelimit"])
    infos = {i.name: i for i in plugins.infos}
    assert "health" in infos and "ratelimit" not in infos
    assert infos["routing"].distribution == "(embedded)"
    assert [i.name for i in plugins.infos].count("routing") == 1


def test_load_plugins_refuses_what_the_core_refuses() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def l4gw_admit(self, flow: Flow) -> Any:
            return (yield)

    with pytest.raises(PluginError, match="plugin w: l4gw_admit: hook wrappers"):
        load_plugins({"w": Wrapper()})


# --- make_config ------------------------------------------------------------------------


def test_make_config_adds_a_listener_and_configures() -> None:
    rec = Recorder()
    plugins = load_plugins({"rec": rec})
    config = make_config('[plugin.recorder]\ntag = "x"\n', plugins)
    assert [li.name for li in config.listeners] == [DEFAULT_LISTENER]
    assert config.plugin("recorder") == {"tag": "x"}
    assert rec.configured == [config]

    make_config("", plugins, configure=False)
    assert rec.configured == [config]


def test_make_config_keeps_the_listeners_given() -> None:
    config = make_config('[[listener]]\nname = "edge"\nbind = "127.0.0.1:0"\n')
    assert [li.name for li in config.listeners] == ["edge"]
    parsed = make_config({"listener": [{"name": "x", "bind": "127.0.0.1:0"}]})
    assert [li.name for li in parsed.listeners] == ["x"]


def test_make_config_problems_as_l4gw_check_reports_them() -> None:
    plugins = load_plugins({"rec": Recorder()})
    with pytest.raises(ConfigError) as err:
        make_config("[plugin.recorder]\ntag = 5\nother = 1\n", plugins)
    assert err.value.problems == [
        "plugin.recorder.other: unknown key",
        "plugin.recorder.tag: expected a string, got an integer",
    ]
    with pytest.raises(ConfigError) as err:
        make_config("[plugin.recorder\n", plugins, path="mine.toml")
    assert err.value.path == "mine.toml" and err.value.problems[0].startswith("not valid TOML")


def test_make_config_a_raising_configure_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="plugin rec: l4gw_configure: RuntimeError"):
        make_config("", load_plugins({"rec": Recorder(fail_in="configure")}))


# --- make_flow --------------------------------------------------------------------------


def test_make_flow_defaults_and_overrides() -> None:
    a, b = make_flow(), make_flow()
    assert b.id > a.id
    assert (a.listener, a.transport, a.client, a.destination) == (
        DEFAULT_LISTENER,
        "tcp",
        ("198.18.0.1", 40000),
        ("198.18.0.2", 443),
    )
    flow = make_flow(
        client="2001:db8::7",
        destination="[2001:db8::1]:8443",
        transport="udp",
        id=7,
        sni="api.example.com",
        alpn=["h2"],
    )
    assert (flow.id, flow.transport, flow.client, flow.destination) == (
        7,
        "udp",
        ("2001:db8::7", 40000),
        ("2001:db8::1", 8443),
    )
    assert (flow.sni, flow.alpn) == ("api.example.com", ("h2",))
    assert make_flow(client="198.18.7.9:5000").client == ("198.18.7.9", 5000)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"snii": "x"}, TypeError),
        ({"set_attribute": 1}, TypeError),
        ({"_trace_id": 1}, TypeError),
        ({"client": "not an address"}, ValueError),
        ({"client": ("not an ip", 1)}, ValueError),
        ({"transport": "sctp"}, ValueError),
    ],
)
def test_make_flow_refuses_what_a_flow_cannot_be(kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        make_flow(**kwargs)


# --- run_decisions ----------------------------------------------------------------------


async def test_a_refusal_is_recorded_as_the_core_records_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder(admit=Refusal("banned client", rule="banned", reset=True))
    plugins = load_plugins({"rec": rec, "router": Router()})
    config = make_config(ROUTED, plugins)
    flow = make_flow(client="198.18.7.9")
    with caplog.at_level(logging.INFO, "l4gw.conn"):
        decision = await run_decisions(plugins, config, flow)
    assert decision.close_reason == CloseReason.REFUSED and not decision.ok
    assert (decision.refused_by, decision.refused_rule, decision.error, decision.reset) == (
        "rec",
        "banned",
        "banned client",
        True,
    )
    assert decision.route is None
    assert (flow.close_reason, flow.refused_by, flow.refused_rule) == ("refused", "rec", "banned")
    assert flow.ended is not None
    assert rec.calls == ["opened", "admit", "closed refused"]
    [line] = caplog.records
    assert line.levelno == logging.WARNING
    assert "client=198.18.7.9:40000" in line.getMessage()
    assert "refused by=rec/banned error='banned client'" in line.getMessage()
    with pytest.raises(ValueError, match="closed already"):
        close_flow(plugins, config, flow)


@pytest.mark.parametrize("async_hooks", [False, True])
async def test_a_flow_that_passes_stays_open_until_closed(async_hooks: bool) -> None:
    rec = Recorder(async_hooks=async_hooks)
    plugins = load_plugins({"rec": rec, "router": Router()})
    config = make_config(ROUTED, plugins)
    flow = make_flow()
    decision = await run_decisions(plugins, config, flow)
    assert decision.ok and decision.close_reason is None
    assert decision.route is not None and decision.route.name == "mine"
    assert (flow.route, flow.cluster, flow.ended) == ("mine", "api", None)
    assert rec.calls == ["opened", "admit", "routed mine"]
    close_flow(plugins, config, flow, CloseReason.BACKEND_EOF)
    assert rec.calls[-1] == "closed backend_eof" and flow.ended is not None


@pytest.mark.parametrize("async_hooks", [False, True])
async def test_routed_refuses_after_the_route_was_chosen(async_hooks: bool) -> None:
    rec = Recorder(routed=Refusal("batch closed", rule="hours"), async_hooks=async_hooks)
    plugins = load_plugins({"rec": rec, "router": Router()})
    config = make_config(ROUTED, plugins)
    decision = await run_decisions(plugins, config, make_flow())
    assert decision.close_reason == CloseReason.REFUSED
    assert decision.route is not None and decision.route.cluster.name == "api"
    assert (decision.refused_by, decision.refused_rule) == ("rec", "hours")
    assert rec.calls == ["opened", "admit", "routed mine", "closed refused"]


async def test_no_route_is_the_cores_refusal() -> None:
    plugins = load_plugins({"rec": Recorder()})
    decision = await run_decisions(plugins, make_config(ROUTED, plugins), make_flow())
    assert (decision.close_reason, decision.refused_by) == (CloseReason.NO_ROUTE, "core")


async def test_the_built_in_router_routes_as_in_l4gw_run() -> None:
    plugins = load_plugins()
    config = make_config(ROUTED, plugins)
    decision = await run_decisions(plugins, config, make_flow())
    assert decision.ok and decision.route is not None
    assert decision.route.cluster.name == "api" and len(decision.route.endpoints) == 2


@pytest.mark.parametrize(
    "policy,expected",
    [("closed", (CloseReason.PLUGIN_ERROR, "rec")), ("open", (None, None))],
)
async def test_admit_on_error_applies(policy: str, expected: tuple[Any, Any]) -> None:
    rec = Recorder(fail_in="admit")
    plugins = load_plugins({"rec": rec, "router": Router()})
    config = make_config(f'[gateway]\nadmit_on_error = "{policy}"\n' + ROUTED, plugins)
    decision = await run_decisions(plugins, config, make_flow())
    assert (decision.close_reason, decision.refused_by) == expected
    if policy == "closed":
        assert decision.error == "RuntimeError('admit fails')"


@pytest.mark.parametrize(
    "policy,expected",
    [("closed", CloseReason.PLUGIN_ERROR), ("open", CloseReason.NO_ROUTE)],
)
async def test_route_on_error_applies(policy: str, expected: str) -> None:
    plugins = load_plugins({"router": Router(fail=True)})
    config = make_config(f'[gateway]\nroute_on_error = "{policy}"\n' + ROUTED, plugins)
    decision = await run_decisions(plugins, config, make_flow())
    assert decision.close_reason == expected


def test_run_decisions_from_sync_code() -> None:
    plugins = load_plugins({"rec": Recorder(admit=Refusal("no"))})
    config = make_config("", plugins)
    decision = trio.run(run_decisions, plugins, config, make_flow())
    assert decision.refused_by == "rec" and decision.refused_rule is None


# --- GatewayProcess and the gateway_process fixture --------------------------------------

GATEWAY = """
[gateway]
drain_timeout = "1s"

[[listener]]
name = "public"
bind = "127.0.0.1:0"

[[listener]]
name = "v6"
bind = "[::1]:0"
"""


def connect(address: tuple[str, int]) -> None:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(5)
        s.connect(address)


@pytest.mark.timeout(60)
def test_gateway_process_in_a_temporary_directory() -> None:
    with GatewayProcess(GATEWAY) as gw:
        workdir = gw.workdir
        assert gw.config_path.read_text() == GATEWAY
        host, port = gw.address("public")
        assert host == "127.0.0.1" and port > 0
        assert gw.address("v6")[0] == "::1"
        connect((host, port))  # no route: accepted, then closed as no_route
        gw.wait_log(r"public client=127\.0\.0\.1:\d+ .* no_route by=core")
        with pytest.raises(LookupError, match="no listener 'nope'"):
            gw.address("nope")
    assert gw.proc is not None and gw.proc.returncode == 0
    assert gw.stop() == 0  # again: nothing to do
    assert not workdir.exists()


@pytest.mark.timeout(60)
def test_gateway_process_reload(tmp_path: Path) -> None:
    gw = GatewayProcess(GATEWAY, workdir=tmp_path, name="reloading").start()
    try:
        first = gw.address("public")
        gw.write_config(GATEWAY.replace('[[listener]]\nname = "v6"', '[[listener]]\nname = "v7"'))
        assert gw.reload() is True
        assert gw.address("public") == first  # unchanged listener kept its socket
        gw.write_config("this is not TOML")
        assert gw.reload() is False
        assert "reload failed; the running config stays" in gw.log
        gw.signal(signal.SIGTERM)
        assert gw.wait() == 0
    finally:
        gw.stop()
    assert (tmp_path / "reloading.log").exists() and (tmp_path / "reloading.toml").exists()


@pytest.mark.timeout(60)
def test_gateway_process_that_cannot_start_says_why(tmp_path: Path) -> None:
    gw = GatewayProcess("[plugin.nobody]\n", workdir=tmp_path)
    with pytest.raises(AssertionError, match=r"gateway exited \(2\) waiting for 'ready: '") as err:
        gw.start()
    assert "at least one [[listener]] is required" in str(err.value)
    assert gw.stop() == 2
    with pytest.raises(LookupError, match="not ready"):
        gw.address()


@pytest.mark.timeout(60)
async def test_await_log_lets_the_loop_run(tmp_path: Path) -> None:
    gw = GatewayProcess(GATEWAY, workdir=tmp_path).start(wait_ready=False)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            await gw.await_log(r"ready: ", timeout=15)
            nursery.cancel_scope.cancel()
        assert ticks > 1
        with pytest.raises(AssertionError, match="timeout waiting for 'never'"):
            await gw.await_log("never", timeout=0.1)
    finally:
        gw.stop()


@pytest.mark.timeout(60)
def test_the_fixture_starts_gateways_by_name(
    gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    a = gateway_process(GATEWAY)
    b = gateway_process(GATEWAY, name="second", env={"L4GW_TEST_MARK": "1"})
    assert a.config_path == tmp_path / "gw.toml" and b.config_path == tmp_path / "second.toml"
    assert b.env["L4GW_TEST_MARK"] == "1"
    assert a.address() != b.address()
    with pytest.raises(ValueError, match="'gw' was started already"):
        gateway_process(GATEWAY)


AUTHORS_TEST = """
import os


def test_starts_two(gateway_process):
    for name in ("one", "two"):
        gw = gateway_process(CONFIG, name=name)
        with open(os.environ["PIDS"], "a") as pids:
            pids.write(f"{gw.proc.pid}\\n")
    ENDING
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ending", ["pass", "assert False, 'the test fails'"])
def test_the_fixture_stops_every_gateway_it_started(tmp_path: Path, ending: str) -> None:
    """As a plugin author uses it: a conftest.py loads gateway.testing, a test starts
    gateways; once that test is over, none of them runs, whether it passed or not."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["gateway.testing"]\n')
    test = f"CONFIG = {GATEWAY!r}\n" + AUTHORS_TEST.replace("ENDING", ending)
    (tmp_path / "test_author.py").write_text(test)
    pids = tmp_path / "pids"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
        env={**os.environ, "PIDS": str(pids)},
    )
    expected = "1 passed" if ending == "pass" else "1 failed"
    assert expected in out.stdout, out.stdout + out.stderr
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2
    for pid in started:
        # Stopped and reaped by the fixture: no such process any more.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
