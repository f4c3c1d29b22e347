"""gateway/plugin_manager.py: loading plugins and the drivers every hook call goes through.

Plugins here are small objects registered through ``extra`` (``installed=False``
keeps the entry points out), except where loading by entry point is the point.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Generator
from typing import Any

import pytest
import trio
import trio.lowlevel

from gateway import Field, Flow, Refusal, hookimpl, schema
from gateway.plugin_manager import AWAITED, PluginError, Plugins, Raised, load


def flow() -> Flow:
    return Flow(1, "public", "tcp", ("198.18.0.1", 40000), ("198.18.0.2", 443))


def only(**plugins: object) -> Plugins:
    return load(extra=plugins, installed=False)


class Abstain:
    @hookimpl
    def l4gw_admit(self, flow: Flow) -> None:
        return None


class Refuse:
    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.calls = 0

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal:
        self.calls += 1
        return Refusal("no", rule=self.rule)


class AsyncRefuse:
    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse

    @hookimpl
    async def l4gw_admit(self, flow: Flow) -> Refusal | None:
        await trio.lowlevel.checkpoint()
        return Refusal("async no", rule="async") if self.refuse else None


class Boom:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> None:
        self.calls += 1
        raise RuntimeError("boom")


# --- loading ----------------------------------------------------------------------------


def test_loads_the_installed_plugins_by_entry_point_in_name_order() -> None:
    plugins = load()
    names = [i.name for i in plugins.infos]
    assert names == sorted(names)
    assert {"routing", "health", "ratelimit", "accesslog", "telemetry", "relay"} <= set(names)
    routing = {i.name: i for i in plugins.infos}["routing"]
    assert (routing.distribution, routing.module) == ("l4gw", "l4gw_plugins.routing:plugin")
    assert "l4gw_route" in routing.hooks


def test_built_in_hooks_registered_under_their_spec_names() -> None:
    """routing and acl implement their per-connection hooks with methods of their own
    names (``specname``, no wrapper call per connection): the hooks are listed under
    the spec's names, and no method name leaks into the hook table."""
    hooks = {i.name: set(i.hooks) for i in load().infos}
    assert {"l4gw_route", "l4gw_connect_attempt", "l4gw_connection_closed"} <= hooks["routing"]
    assert "l4gw_admit" in hooks["acl"]
    assert all(h.startswith("l4gw_") for h in set().union(*hooks.values()))


def test_disabled_plugins_are_not_loaded() -> None:
    names = {i.name for i in load(disabled=["ratelimit", "accesslog"]).infos}
    assert "routing" in names and not names & {"ratelimit", "accesslog"}


def test_objects_alone_without_entry_points() -> None:
    plugins = only(mine=Refuse("r"))
    assert [(i.name, i.distribution, i.hooks) for i in plugins.infos] == [
        ("mine", "(embedded)", ("l4gw_admit",))
    ]
    assert plugins.implements("l4gw_admit") and not plugins.implements("l4gw_route")


def test_a_module_is_a_plugin_too() -> None:
    module = types.ModuleType("l4gw_test_module_plugin")

    @hookimpl
    def l4gw_admit(flow: Flow) -> Refusal:
        return Refusal("module says no")

    module.l4gw_admit = l4gw_admit  # type: ignore[attr-defined]
    assert only(mod=module).implements("l4gw_admit")


def test_an_object_beside_the_installed_plugins() -> None:
    plugins = load(extra={"mine": Abstain()})
    names = [i.name for i in plugins.infos]
    assert "routing" in names and names[-1] == "mine"


def test_a_name_taken_twice_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="plugin routing"):
        load(extra={"routing": Abstain()})


def test_an_unknown_hook_is_a_plugin_error() -> None:
    class Typo:
        @hookimpl
        def l4gw_admitt(self, flow: Flow) -> None:
            return None

    with pytest.raises(PluginError, match="l4gw_admitt"):
        only(typo=Typo())


def test_a_hook_argument_the_spec_lacks_is_a_plugin_error() -> None:
    class Wrong:
        @hookimpl
        def l4gw_admit(self, flow: Flow, client: Any) -> None:
            return None

    with pytest.raises(PluginError, match="client"):
        only(wrong=Wrong())


@pytest.mark.parametrize("kind", ["wrapper", "hookwrapper"])
def test_hook_wrappers_are_refused_naming_plugin_and_hook(kind: str) -> None:
    """The drivers call each implementation themselves: pluggy sorts a wrapper last,
    the first-result driver would call it as an ordinary implementation and take the
    generator it returns for a decision (every connection would end as internal_error)."""

    class Wrapping:
        @hookimpl(**{kind: True})
        def l4gw_admit(self, flow: Flow) -> Generator[None, Any, Any]:
            return (yield)

    with pytest.raises(PluginError) as err:
        only(wrapping=Wrapping(), other=Abstain())
    message = str(err.value)
    assert message.startswith("plugin wrapping: l4gw_admit: hook wrappers")
    assert f"{kind}=True" in message and "tryfirst=True" in message


@pytest.mark.parametrize("hook", ["l4gw_connection_closed", "l4gw_configure", "l4gw_status"])
def test_an_async_hook_that_is_not_awaited_is_refused(hook: str) -> None:
    args = {
        "l4gw_connection_closed": "flow",
        "l4gw_configure": "config",
        "l4gw_status": "",
    }[hook]
    namespace: dict[str, Any] = {}
    exec(f"async def {hook}(self, {args}): return None", namespace)
    plugin_class = type("AsyncObserver", (), {hook: hookimpl(namespace[hook])})
    with pytest.raises(PluginError) as err:
        only(obs=plugin_class())
    assert str(err.value).startswith(f"plugin obs: {hook}: is async def")


@pytest.mark.parametrize("hook", sorted(AWAITED - {"l4gw_relay"}))
def test_async_is_fine_where_the_core_awaits(hook: str) -> None:
    args = {
        "l4gw_admit": "flow",
        "l4gw_route": "flow, config",
        "l4gw_routed": "flow, route",
        "l4gw_startup": "config, nursery",
    }[hook]
    namespace: dict[str, Any] = {}
    exec(f"async def {hook}(self, {args}): return None", namespace)
    plugin_class = type("AsyncDecider", (), {hook: hookimpl(namespace[hook])})
    assert only(ok=plugin_class()).implements(hook)


# --- schemas ----------------------------------------------------------------------------


class Sections:
    def __init__(self, sections: dict[str, Any] | None) -> None:
        self.sections = sections

    @hookimpl
    def l4gw_config_sections(self) -> dict[str, Any] | None:
        return self.sections


def test_schemas_of_every_plugin() -> None:
    a = {"key": Field(schema.integer(), 1)}
    b = {"other": Field(schema.string, "")}
    plugins = only(a=Sections({"a": a}), b=Sections({"b": b}), none=Sections(None))
    assert plugins.schemas() == {"a": a, "b": b}


def test_a_section_declared_twice_is_a_plugin_error() -> None:
    plugins = only(a=Sections({"same": {}}), b=Sections({"same": {}}))
    with pytest.raises(PluginError, match="section same declared twice"):
        plugins.schemas()


def test_raising_in_config_sections_is_a_plugin_error() -> None:
    class Broken:
        @hookimpl
        def l4gw_config_sections(self) -> None:
            raise ValueError("bad schema")

    with pytest.raises(PluginError, match=r"plugin broken: l4gw_config_sections: ValueError"):
        only(broken=Broken()).schemas()


# --- call_all, observe, collect, offer --------------------------------------------------


class Lifecycle:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    @hookimpl
    def l4gw_reopen(self) -> str:
        self.log.append(self.name)
        if self.fail:
            raise OSError("cannot reopen")
        return self.name

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("observer fails")

    @hookimpl
    def l4gw_status(self) -> dict[str, Any] | None:
        if self.fail:
            raise RuntimeError("status fails")
        return {"name": self.name} if self.name != "quiet" else None


def test_call_all_in_plugin_order_with_results() -> None:
    log: list[str] = []
    plugins = only(first=Lifecycle("first", log), second=Lifecycle("second", log))
    # pluggy's order: the last registered first.
    assert plugins.call_all("l4gw_reopen") == [("second", "second"), ("first", "first")]
    assert log == ["second", "first"]


def test_call_all_stops_at_a_raising_plugin_with_a_plugin_error() -> None:
    log: list[str] = []
    plugins = only(first=Lifecycle("first", log), bad=Lifecycle("bad", log, fail=True))
    with pytest.raises(PluginError, match=r"plugin bad: l4gw_reopen: OSError"):
        plugins.call_all("l4gw_reopen")
    assert log == ["bad"]


def test_observe_isolates_each_plugins_error(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    plugins = only(
        a=Lifecycle("a", log), bad=Lifecycle("bad", log, fail=True), c=Lifecycle("c", log)
    )
    with caplog.at_level(logging.ERROR, "l4gw.plugins"):
        plugins.observe("l4gw_connection_closed", flow=flow())
    assert log == ["c", "bad", "a"]
    [record] = caplog.records
    assert record.getMessage() == "plugin bad raised in l4gw_connection_closed"
    assert record.exc_info is not None


def test_collect_reports_an_error_in_its_place(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    plugins = only(
        a=Lifecycle("a", log), quiet=Lifecycle("quiet", log), bad=Lifecycle("bad", log, True)
    )
    with caplog.at_level(logging.ERROR, "l4gw.plugins"):
        status = plugins.collect("l4gw_status")
    assert status == {"a": {"name": "a"}, "bad": {"error": "RuntimeError('status fails')"}}
    assert "plugin bad raised in l4gw_status" in caplog.text


def test_offer_takes_the_first_non_none_without_awaiting_it() -> None:
    class Relay:
        def __init__(self, answer: Any, fail: bool = False) -> None:
            self.answer, self.fail = answer, fail

        @hookimpl
        def l4gw_relay(self, flow: Flow, client: Any, upstream: Any, idle_timeout: float) -> Any:
            if self.fail:
                raise RuntimeError("relay plugin fails")
            return self.answer

    sentinel = object()
    plugins = only(a=Relay(sentinel), none=Relay(None), bad=Relay(None, fail=True))
    offer = plugins.offer("l4gw_relay", flow=flow(), client=None, upstream=None, idle_timeout=1)
    assert offer == ("a", sentinel)


# --- decide: the first-result driver ----------------------------------------------------


async def test_decide_first_non_none_in_plugin_order() -> None:
    early, late = Refuse("late-registered"), Refuse("early-registered")
    plugins = only(early=late, late=early, abstain=Abstain())
    result = await plugins.decide("l4gw_admit", False, flow=flow())
    # Order: abstain (last registered) first, then "late", which refuses: "early" never runs.
    assert result is not None and result[0] == "late"
    assert result[1].rule == "late-registered"
    assert (early.calls, late.calls) == (1, 0)


async def test_decide_none_when_every_plugin_abstains() -> None:
    plugins = only(a=Abstain(), b=AsyncRefuse(False))
    assert await plugins.decide("l4gw_admit", False, flow=flow()) is None
    assert await only(a=Abstain()).decide("l4gw_admit", False, flow=flow()) is None
    assert await only().decide("l4gw_admit", False, flow=flow()) is None


async def test_decide_awaits_async_results_and_an_async_none_abstains() -> None:
    refuse = Refuse("sync")
    plugins = only(sync=refuse, async_abstains=AsyncRefuse(False))
    result = await plugins.decide("l4gw_admit", False, flow=flow())
    assert result is not None and result[0] == "sync" and refuse.calls == 1

    result = await only(a=AsyncRefuse(True)).decide("l4gw_admit", False, flow=flow())
    assert result is not None and result[0] == "a" and result[1].rule == "async"


async def test_decide_an_awaitable_returned_by_a_plain_function() -> None:
    class Deferred:
        @hookimpl
        def l4gw_admit(self, flow: Flow) -> Any:
            async def later() -> Refusal:
                return Refusal("later", rule="deferred")

            return later()

    result = await only(d=Deferred()).decide("l4gw_admit", False, flow=flow())
    assert result is not None and result[1].rule == "deferred"


async def test_decide_fail_closed_raises_naming_the_plugin(
    caplog: pytest.LogCaptureFixture,
) -> None:
    after = Refuse("after")
    boom = Boom()
    plugins = only(after=after, boom=boom)
    with caplog.at_level(logging.ERROR, "l4gw.plugins"), pytest.raises(Raised) as err:
        await plugins.decide("l4gw_admit", False, flow=flow())
    assert err.value.plugin == "boom" and isinstance(err.value.error, RuntimeError)
    assert after.calls == 0
    assert "plugin boom raised in l4gw_admit: RuntimeError('boom')" in caplog.text


async def test_decide_fail_open_skips_the_raising_plugin(caplog: pytest.LogCaptureFixture) -> None:
    after, boom = Refuse("after"), Boom()
    plugins = only(after=after, boom=boom, abstain=Abstain())
    with caplog.at_level(logging.ERROR, "l4gw.plugins"):
        result = await plugins.decide("l4gw_admit", True, flow=flow())
    assert result is not None and result[0] == "after"
    assert (boom.calls, after.calls) == (1, 1)
    assert "plugin boom raised in l4gw_admit" in caplog.text


async def test_decide_fail_open_with_only_raising_plugins_is_none() -> None:
    a, b = Boom(), Boom()
    assert await only(a=a, b=b).decide("l4gw_admit", True, flow=flow()) is None
    assert (a.calls, b.calls) == (1, 1)


async def test_decide_an_async_raise_follows_the_same_policy() -> None:
    class AsyncBoom:
        @hookimpl
        async def l4gw_admit(self, flow: Flow) -> None:
            await trio.lowlevel.checkpoint()
            raise RuntimeError("async boom")

    plugins = only(after=Refuse("after"), boom=AsyncBoom())
    with pytest.raises(Raised, match="boom"):
        await plugins.decide("l4gw_admit", False, flow=flow())
    result = await plugins.decide("l4gw_admit", True, flow=flow())
    assert result is not None and result[0] == "after"


async def test_decide_tryfirst_and_trylast() -> None:
    class First:
        @hookimpl(tryfirst=True)
        def l4gw_admit(self, flow: Flow) -> Refusal:
            return Refusal("first", rule="first")

    class Last:
        @hookimpl(trylast=True)
        def l4gw_admit(self, flow: Flow) -> Refusal:
            return Refusal("last", rule="last")

    # Registered first, but tryfirst; registered last, but trylast.
    plugins = only(first=First(), plain=Refuse("plain"), last=Last())
    result = await plugins.decide("l4gw_admit", False, flow=flow())
    assert result is not None and result[1].rule == "first"
    plugins = only(plain=Refuse("plain"), last=Last())
    result = await plugins.decide("l4gw_admit", False, flow=flow())
    assert result is not None and result[1].rule == "plain"


async def test_decide_passes_each_implementation_the_arguments_it_names() -> None:
    seen: list[tuple[str, ...]] = []

    class Narrow:
        @hookimpl
        def l4gw_route(self, flow: Flow) -> None:
            seen.append(("flow",))

    class Wide:
        @hookimpl
        def l4gw_route(self, flow: Flow, config: Any) -> None:
            seen.append(("flow", config))

    await only(narrow=Narrow(), wide=Wide()).decide(
        "l4gw_route", False, flow=flow(), config="the config"
    )
    assert seen == [("flow", "the config"), ("flow",)]


@pytest.mark.parametrize("called", ["by position", "by name"])
def test_each_calling_form_gets_the_arguments_it_names(called: str) -> None:
    """The drivers take a hook's arguments by position in its spec's order (the core's
    calls) or by name (a plugin's tests), and call each implementation with the ones
    it names: all of them, a prefix, a subset with gaps, in any parameter order,
    positional-only too."""
    seen: dict[str, tuple[Any, ...]] = {}

    class Reordered:
        @hookimpl
        def l4gw_connect_attempt(
            self, seconds: float, error: Any, endpoint: Any, flow: Flow
        ) -> None:
            seen["reordered"] = (flow.id, endpoint, error, seconds)

    class PositionalOnly:
        @hookimpl
        def l4gw_connect_attempt(
            self, flow: Flow, endpoint: Any, error: Any, seconds: float, /
        ) -> None:
            seen["positional"] = (flow.id, endpoint, error, seconds)

    class Two:
        @hookimpl
        def l4gw_connect_attempt(self, error: Any, flow: Flow) -> None:
            seen["two"] = (flow.id, error)

    class One:
        @hookimpl
        def l4gw_connect_attempt(self, seconds: float) -> None:
            seen["one"] = (seconds,)

    class Prefix:
        @hookimpl
        def l4gw_connect_attempt(self, flow: Flow, endpoint: Any, error: Any) -> None:
            seen["prefix"] = (flow.id, endpoint, error)

    f = flow()
    plugins = only(a=Reordered(), b=PositionalOnly(), c=Two(), d=One(), e=Prefix())
    if called == "by position":
        plugins.observe("l4gw_connect_attempt", f, "ep", "boom", 0.5)
    else:
        plugins.observe("l4gw_connect_attempt", flow=f, endpoint="ep", error="boom", seconds=0.5)
    assert seen == {
        "reordered": (f.id, "ep", "boom", 0.5),
        "positional": (f.id, "ep", "boom", 0.5),
        "two": (f.id, "boom"),
        "one": (0.5,),
        "prefix": (f.id, "ep", "boom"),
    }


def test_an_optional_hook_of_a_later_l4gw_loads_and_is_never_called() -> None:
    class Later:
        @hookimpl(optionalhook=True)
        def l4gw_not_yet_a_hook(self, flow: Flow, what: Any) -> None:
            raise AssertionError("called")

        @hookimpl
        def l4gw_connection_closed(self, flow: Flow) -> None:
            seen.append(flow)

    seen: list[Flow] = []
    plugins = only(later=Later())
    f = flow()
    plugins.observe("l4gw_connection_closed", f)
    assert seen == [f]


@pytest.mark.parametrize(
    "given",
    [
        {"flow": None, "endpoint": "ep", "error": None},  # seconds missing
        {"flow": None, "endpoint": "ep", "error": None, "seconds": 0.5, "extra": 1},
    ],
    ids=["missing", "unknown"],
)
def test_arguments_by_name_must_be_the_specs(given: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=r"l4gw_connect_attempt: give all of \(flow, endpoint"):
        only().observe("l4gw_connect_attempt", **given)
    with pytest.raises(TypeError, match="by position or by name"):
        only().observe("l4gw_connect_attempt", None, endpoint="ep")


# --- idle hooks (what l4gw_configure returns) ---------------------------------------------


class Declares:
    """Admits and observes closes; its ``l4gw_configure`` returns ``idle``."""

    def __init__(self, idle: Any) -> None:
        self.idle = idle
        self.admitted = 0
        self.closed = 0

    @hookimpl
    def l4gw_configure(self, config: Any) -> Any:
        return self.idle

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> None:
        self.admitted += 1

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        self.closed += 1


async def test_configure_leaves_out_the_hooks_a_plugin_declares_idle() -> None:
    quiet, busy = Declares({"l4gw_admit"}), Declares(None)
    loaded = only(quiet=quiet, busy=busy)
    table = loaded.configure(object())
    assert table.idle == {"quiet": frozenset({"l4gw_admit"})}
    assert await table.decide("l4gw_admit", True, flow=flow()) is None
    table.closed(flow())
    assert (quiet.admitted, quiet.closed, busy.admitted, busy.closed) == (0, 1, 1, 1)
    # The loaded table is untouched: a configuration declaring nothing gets it back.
    assert loaded.idle == {} and loaded.implements("l4gw_admit")
    quiet.idle = ()
    assert table.configure(object()) is loaded


def test_a_hook_nobody_is_left_in_is_not_implemented() -> None:
    table = only(quiet=Declares(["l4gw_admit", "l4gw_connection_closed"])).configure(object())
    assert not table.implements("l4gw_admit")
    assert not table.implements("l4gw_connection_closed")
    assert table.implements("l4gw_configure")  # lifecycle hooks are never idle


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        ({"l4gw_admitt"}, "'l4gw_admitt' not a per-connection hook"),
        ({"l4gw_startup"}, "'l4gw_startup' not a per-connection hook"),
        ("l4gw_admit", "expected None or a collection"),
        (True, "expected None or a collection"),
    ],
)
def test_a_wrong_idle_declaration_is_a_plugin_error_naming_the_plugin(
    returned: object, problem: str
) -> None:
    plugins = only(odd=Declares(returned))
    with pytest.raises(PluginError, match=r"plugin odd: l4gw_configure returned") as err:
        plugins.configure(object())
    assert problem in str(err.value)


def test_configure_wraps_a_raise_naming_the_plugin() -> None:
    class Fails:
        @hookimpl
        def l4gw_configure(self, config: Any) -> None:
            raise ValueError("bad section")

    with pytest.raises(PluginError, match=r"plugin fails: l4gw_configure: ValueError"):
        only(fails=Fails()).configure(object())
