"""plugins/relay.py: a thin adaptor over gateway.relay, one object per plugin instance."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import trio

import l4gw_plugins.relay as relay_module
from gateway import Flow, Handover
from gateway.relay.policy import DEFAULT_TIERS
from gateway.relay.tiers import RelayTiers
from gateway.testing import load_plugins, make_config, make_flow
from l4gw_plugins.relay import RelayPlugin

HOOKS = (
    "l4gw_config_sections",
    "l4gw_configure",
    "l4gw_relay",
    "l4gw_shutdown",
    "l4gw_startup",
    "l4gw_status",
)


def test_the_entry_point_registers_the_plugin_object_with_its_hooks() -> None:
    plugins = load_plugins(installed=True)
    (info,) = [i for i in plugins.infos if i.name == "relay"]
    assert (info.module, info.hooks) == ("l4gw_plugins.relay:plugin", HOOKS)
    assert plugins.pm.get_plugin("relay") is relay_module.plugin
    for caller in plugins.pm.get_hookcallers(relay_module.plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin_name == "relay":
                assert impl.function.__self__ is relay_module.plugin  # type: ignore[attr-defined]


def test_each_instance_has_its_own_tiers() -> None:
    a, b = RelayPlugin(), RelayPlugin()
    plugins = load_plugins({"relay": a})
    make_config('[plugin.relay]\ntiers = ["splice"]\npromote_after = 0\n', plugins)
    assert a.tiers.policy.tiers == ("splice", "copy") and a.tiers.policy.immediate
    assert b.tiers.policy.tiers == DEFAULT_TIERS and b.tiers is not a.tiers
    shared = RelayTiers()
    assert RelayPlugin(shared).tiers is shared


def test_flows_stay_with_the_core_until_a_kernel_tier_is_enabled() -> None:
    """Zero cost when off: no plan (not started, or no kernel tier), no relay."""
    plugin = RelayPlugin()
    plugins = load_plugins({"relay": plugin})
    make_config('[plugin.relay]\ntiers = ["splice"]\n', plugins)
    flow = make_flow()
    assert (
        plugins.offer("l4gw_relay", flow=flow, client=None, upstream=None, idle_timeout=1) is None
    )
    status = plugins.collect("l4gw_status")["relay"]
    assert status["active"] is False and status["policy"]["tiers"] == ["splice", "copy"]
    assert status["tiers"]["splice"]["configured"] and not status["tiers"]["sockmap"]["configured"]


async def test_startup_enables_splice_publishes_status_and_shutdown_cleans_up(
    tmp_path: Path,
) -> None:
    plugin = RelayPlugin()
    plugins = load_plugins({"relay": plugin})
    status_dir = tmp_path / "status"
    config = make_config(
        f'[plugin.relay]\ntiers = ["splice"]\nstatus_dir = "{status_dir}"\n', plugins
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await plugin.l4gw_startup(config, nursery)
            assert plugin.tiers.plan == ("splice",)
            st = plugin.l4gw_status()
            assert (
                st["tiers"]["splice"]["enabled"] and st["tiers"]["splice"]["self_test"] == "passed"
            )
            assert st["tiers"]["sockmap"]["why_not"] == "not in [plugin.relay] tiers"
            published = status_dir / f"{st['pid']}.json"
            while not published.exists():
                await trio.sleep(0.01)
            assert json.loads(published.read_text())["policy"]["tiers"] == ["splice", "copy"]
            flow: Flow = make_flow()
            # Promotion after so many bytes or seconds: the core copies first, the
            # same Handover for every flow, whose ``then`` is the tiers'.
            answer = plugin.l4gw_relay(flow, None, None, 1.0)  # type: ignore[arg-type]
            assert isinstance(answer, Handover)
            assert answer is plugin.l4gw_relay(make_flow(), None, None, 1.0)  # type: ignore[arg-type]
            policy = plugin.tiers.policy
            assert (answer.after_bytes, answer.after_seconds) == (
                policy.after_bytes,
                policy.after_seconds,
            )
            assert answer.then == plugin.tiers.promoted
            assert answer.counters is plugin.tiers.tiers["copy"].counters
            plugin.l4gw_shutdown(config)
            assert plugin.tiers.plan == () and not published.exists()
            assert plugin.l4gw_relay(flow, None, None, 1.0) is None  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()


async def test_promotion_at_once_answers_the_whole_relay() -> None:
    """Nothing to copy first: the answer is the tiers' relay itself, per flow."""
    plugin = RelayPlugin()
    plugins = load_plugins({"relay": plugin})
    section = 'tiers = ["splice"]\npromote_after_bytes = 0\nstatus_dir = ""\n'
    config = make_config(f"[plugin.relay]\n{section}", plugins)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await plugin.l4gw_startup(config, nursery)
    assert plugin.tiers.plan == ("splice",) and plugin.tiers.handover is None
    answer = plugin.l4gw_relay(make_flow(), None, None, 1.0)  # type: ignore[arg-type]
    assert inspect.iscoroutine(answer)
    answer.close()  # not run
    plugin.l4gw_shutdown(config)
