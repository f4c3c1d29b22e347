"""plugins/telemetry.py: a thin adaptor over gateway.telemetry, one object per instance."""

from __future__ import annotations

from typing import Any

import l4gw_plugins.telemetry as telemetry_module
from gateway.telemetry.recorder import FlowTelemetry
from gateway.testing import load_plugins, make_config, make_flow
from l4gw_plugins.telemetry import TelemetryPlugin

HOOKS = (
    "l4gw_admit",
    "l4gw_configure",
    "l4gw_connect_attempt",
    "l4gw_connection_closed",
    "l4gw_connection_opened",
    "l4gw_shutdown",
    "l4gw_startup",
)


class FakeRecorder:
    """Notes which hook reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def opened(self, flow: Any) -> None:
        self.seen.append(("opened", flow.id))

    def admitted(self, flow: Any) -> None:
        self.seen.append(("admitted", flow.id))

    def connect_attempt(self, flow: Any, endpoint: Any, error: Any, seconds: float) -> None:
        self.seen.append(("connect_attempt", flow.id))

    def closed(self, flow: Any) -> None:
        self.seen.append(("closed", flow.id))


class FakeTelemetry(FlowTelemetry):
    def __init__(self, recorder: FakeRecorder | None) -> None:
        super().__init__()
        self.fake = recorder
        self.configured = 0

    def configure(self, config: Any) -> None:
        self.configured += 1
        self.recorder = self.fake  # type: ignore[assignment]


def test_the_entry_point_registers_the_plugin_object_with_its_hooks() -> None:
    plugins = load_plugins(installed=True)
    (info,) = [i for i in plugins.infos if i.name == "telemetry"]
    assert (info.module, info.hooks) == ("l4gw_plugins.telemetry:plugin", HOOKS)
    assert plugins.pm.get_plugin("telemetry") is telemetry_module.plugin
    impls = [
        impl
        for caller in plugins.pm.get_hookcallers(telemetry_module.plugin) or []
        for impl in caller.get_hookimpls()
        if impl.plugin_name == "telemetry"
    ]
    assert len(impls) == len(HOOKS)
    assert all(impl.function.__self__ is telemetry_module.plugin for impl in impls)  # type: ignore[attr-defined]
    (admit,) = [i for i in impls if i.function.__name__ == "l4gw_admit"]
    assert admit.trylast  # after every plugin that may refuse


def test_every_hook_reaches_the_recorder_of_its_own_instance() -> None:
    recorder = FakeRecorder()
    plugin = TelemetryPlugin(FakeTelemetry(recorder))
    other = TelemetryPlugin()
    plugins = load_plugins({"telemetry": plugin})
    make_config("", plugins)
    flow = make_flow(id=7)
    plugins.observe("l4gw_connection_opened", flow=flow)
    plugin.l4gw_admit(flow)
    plugins.observe("l4gw_connect_attempt", flow=flow, endpoint=None, error=None, seconds=0.001)
    plugins.observe("l4gw_connection_closed", flow=flow)
    assert recorder.seen == [
        ("opened", 7),
        ("admitted", 7),
        ("connect_attempt", 7),
        ("closed", 7),
    ]
    assert other.recorder is None and other.telemetry is not plugin.telemetry


def test_off_each_hook_returns_at_its_first_line() -> None:
    telemetry = FakeTelemetry(None)
    plugin = TelemetryPlugin(telemetry)
    plugins = load_plugins({"telemetry": plugin})
    make_config("", plugins)
    assert telemetry.configured == 1 and plugin.recorder is None
    flow = make_flow()
    plugin.l4gw_connection_opened(flow)
    assert plugin.l4gw_admit(flow) is None
    plugin.l4gw_connection_closed(flow)
    assert flow.trace_id is None


def test_off_its_per_connection_hooks_are_declared_idle() -> None:
    off = TelemetryPlugin(FakeTelemetry(None))
    table = load_plugins({"telemetry": off}).configure(make_config("", configure=False))
    assert table.idle["telemetry"] == {
        "l4gw_connection_opened",
        "l4gw_admit",
        "l4gw_connect_attempt",
        "l4gw_connection_closed",
    }
    on = TelemetryPlugin(FakeTelemetry(FakeRecorder()))
    table = load_plugins({"telemetry": on}).configure(make_config("", configure=False))
    assert "telemetry" not in table.idle
