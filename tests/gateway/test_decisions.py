"""gateway/decisions.py with a real plugin manager: admit/routed refusals, the route
choice and the failure policies (``admit_on_error``, ``route_on_error``), then the
connect loop over a route's endpoints against real loopback listeners.

The plugins are small objects defined here and loaded by the core's loader
(every installed plugin disabled), so the hooks run through the same drivers as
in ``l4gw run``. pluggy asks the plugin registered last first.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from gateway import Refusal, Route, hookimpl
from gateway.config import Config, Endpoint, from_dict
from gateway.decisions import choose_route, connect_upstream, refusal
from gateway.flow import CloseReason, Flow
from gateway.plugin_manager import ENTRY_POINT_GROUP, load
from gateway.relay.copy import CopyRelay
from gateway.runtime import Runtime
from gateway.upstream import connect

from backends import reset_next_handshake, stalled_listener
from gwproc import free_port

INSTALLED = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def make_config(gateway: str = "", endpoints: list[str] | None = None, cluster: str = "") -> Config:
    listed = ", ".join(f'"{e}"' for e in endpoints or ["127.0.0.1:9"])
    text = f"""
        [gateway]
        {gateway}

        [[listener]]
        name = "public"
        bind = "127.0.0.1:0"

        [[route]]
        listener = "public"
        cluster = "api"

        [cluster.api]
        endpoints = [{listed}]
        {cluster}
    """
    return from_dict(tomllib.loads(text.replace("\n        ", "\n")), "test.toml", {})


def runtime(config: Config | None = None, **plugins: object) -> Runtime:
    """A runtime whose plugins are exactly ``plugins`` (registered in that order)."""
    config = config or make_config()
    loaded = load(disabled=INSTALLED, extra=plugins)
    return Runtime(config, loaded, CopyRelay(config.gateway.buffer_size), {})


def new_flow() -> Flow:
    return Flow(1, "public", "tcp", ("198.18.0.10", 40000), ("198.18.1.1", 443))


def route_to(config: Config, *endpoints: Endpoint, name: str = "r") -> Route:
    cluster = config.clusters["api"]
    return Route(name, cluster, endpoints or cluster.endpoints)


# --- plugins ----------------------------------------------------------------------


class Admit:
    """Answers ``l4gw_admit`` and ``l4gw_routed`` with ``answer`` (None abstains)."""

    def __init__(self, answer: Refusal | None = None) -> None:
        self.answer = answer
        self.seen: list[tuple[str, Flow, Route | None]] = []

    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal | None:
        self.seen.append(("admit", flow, None))
        return self.answer

    @hookimpl
    def l4gw_routed(self, flow: Flow, route: Route) -> Refusal | None:
        self.seen.append(("routed", flow, route))
        return self.answer


class AsyncAdmit:
    """``async def`` decisions: awaited, and an async None abstains."""

    def __init__(self, answer: Refusal | None = None) -> None:
        self.answer = answer
        self.awaited = 0

    @hookimpl
    async def l4gw_admit(self, flow: Flow) -> Refusal | None:
        await trio.lowlevel.checkpoint()
        self.awaited += 1
        return self.answer


class Raises:
    @hookimpl
    def l4gw_admit(self, flow: Flow) -> Refusal | None:
        raise RuntimeError("admit broke")

    @hookimpl
    def l4gw_route(self, flow: Flow, config: Config) -> Route | None:
        raise RuntimeError("route broke")


class Router:
    """Routes every flow to the "api" cluster under the route name ``name``."""

    def __init__(self, name: str = "r", asynchronous: bool = False) -> None:
        self.name = name
        self.asynchronous = asynchronous

    @hookimpl
    def l4gw_route(self, flow: Flow, config: Config) -> Any:
        route = route_to(config, name=self.name)
        if not self.asynchronous:
            return route

        async def later() -> Route:
            await trio.lowlevel.checkpoint()
            return route

        return later()


class Attempts:
    """Records ``l4gw_connect_attempt``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    @hookimpl
    def l4gw_connect_attempt(
        self, flow: Flow, endpoint: Endpoint, error: str | None, seconds: float
    ) -> None:
        assert seconds >= 0
        self.seen.append((str(endpoint), error))


# --- admit and routed -----------------------------------------------------------------


async def test_nobody_refuses() -> None:
    watcher = Admit()
    rt = runtime(watcher=watcher)
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") is None
    assert [(hook, f) for hook, f, _ in watcher.seen] == [("admit", flow)]
    assert (flow.refused_by, flow.refused_rule, flow.error) == (None, None, None)


@pytest.mark.parametrize("reset", [False, True])
async def test_a_refusal_is_recorded_on_the_flow(reset: bool) -> None:
    rt = runtime(deny=Admit(Refusal("blocked network", rule="per_client", reset=reset)))
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.REFUSED, reset)
    assert (flow.refused_by, flow.refused_rule, flow.error) == (
        "deny",
        "per_client",
        "blocked network",
    )


async def test_a_refusal_without_a_rule() -> None:
    rt = runtime(deny=Admit(Refusal("no")))
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.REFUSED, False)
    assert (flow.refused_by, flow.refused_rule, flow.error) == ("deny", None, "no")


async def test_async_abstain_asks_the_next_plugin() -> None:
    # Registered last, asked first: the async plugin abstains, the other refuses.
    first = AsyncAdmit(None)
    rt = runtime(deny=Admit(Refusal("later")), first=first)
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.REFUSED, False)
    assert first.awaited == 1
    assert flow.refused_by == "deny"


async def test_async_refusal() -> None:
    rt = runtime(deny=AsyncAdmit(Refusal("async says no", reset=True)))
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.REFUSED, True)
    assert (flow.refused_by, flow.error) == ("deny", "async says no")


async def test_the_first_answer_wins() -> None:
    later = Admit(Refusal("second"))
    rt = runtime(later=later, first=Admit(Refusal("first")))
    flow = new_flow()
    await refusal(rt, flow, "l4gw_admit")
    assert flow.error == "first"
    assert later.seen == []


async def test_a_raising_admit_refuses_when_closed() -> None:
    watcher = Admit()
    rt = runtime(make_config('admit_on_error = "closed"'), watcher=watcher, broken=Raises())
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.PLUGIN_ERROR, False)
    assert flow.refused_by == "broken"
    assert flow.error == repr(RuntimeError("admit broke"))
    assert watcher.seen == []


async def test_a_raising_admit_is_skipped_when_open() -> None:
    watcher = Admit()
    rt = runtime(make_config('admit_on_error = "open"'), watcher=watcher, broken=Raises())
    flow = new_flow()
    assert await refusal(rt, flow, "l4gw_admit") is None
    assert len(watcher.seen) == 1
    assert flow.refused_by is None

    rt = runtime(make_config('admit_on_error = "open"'), deny=Admit(Refusal("no")), b=Raises())
    assert await refusal(rt, flow, "l4gw_admit") == (CloseReason.REFUSED, False)
    assert flow.refused_by == "deny"


async def test_routed_sees_the_route() -> None:
    deny = Admit(Refusal("not to this route", rule="routes"))
    rt = runtime(deny=deny)
    flow = new_flow()
    route = route_to(rt.config)
    assert await refusal(rt, flow, "l4gw_routed", route) == (CloseReason.REFUSED, False)
    assert deny.seen == [("routed", flow, route)]
    assert (flow.refused_by, flow.refused_rule) == ("deny", "routes")


# --- route ------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_route_is_chosen_and_recorded(asynchronous: bool) -> None:
    rt = runtime(router=Router("api-route", asynchronous))
    flow = new_flow()
    route = await choose_route(rt, flow)
    assert isinstance(route, Route)
    assert (route.name, route.cluster.name) == ("api-route", "api")
    assert (flow.route, flow.cluster) == ("api-route", "api")
    assert flow.events[-1] == ("routed", {"route": "api-route", "cluster": "api"})
    assert flow.refused_by is None


async def test_no_route() -> None:
    rt = runtime(watcher=Admit())
    flow = new_flow()
    assert await choose_route(rt, flow) == CloseReason.NO_ROUTE
    assert flow.refused_by == "core"
    assert flow.route is None
    assert not flow.events


async def test_a_raising_router_refuses_when_closed() -> None:
    rt = runtime(make_config('route_on_error = "closed"'), router=Router(), broken=Raises())
    flow = new_flow()
    assert await choose_route(rt, flow) == CloseReason.PLUGIN_ERROR
    assert flow.refused_by == "broken"
    assert flow.error == repr(RuntimeError("route broke"))
    assert flow.route is None


async def test_a_raising_router_is_skipped_when_open() -> None:
    rt = runtime(make_config('route_on_error = "open"'), router=Router(), broken=Raises())
    flow = new_flow()
    route = await choose_route(rt, flow)
    assert isinstance(route, Route)
    assert flow.route == "r"
    assert flow.refused_by is None

    rt = runtime(make_config('route_on_error = "open"'), broken=Raises())
    assert await choose_route(rt, new_flow()) == CloseReason.NO_ROUTE


# --- the connect loop -----------------------------------------------------------------


@pytest.fixture
def live() -> Iterator[socket.socket]:
    """A listening backend on loopback."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(8)
    lsn.setblocking(False)
    yield lsn
    lsn.close()


def endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


def accepted(lsn: socket.socket) -> int:
    """How many connections wait on ``lsn`` (it is non-blocking)."""
    count = 0
    while True:
        try:
            conn, _ = lsn.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


async def test_connects_past_a_refused_endpoint(live: socket.socket) -> None:
    closed = Endpoint("127.0.0.1", free_port())
    attempts = Attempts()
    rt = runtime(make_config(cluster="connect_attempts = 3"), attempts=attempts)
    flow = new_flow()
    with trio.fail_after(10):
        sock = await connect_upstream(
            rt, route_to(rt.config, closed, endpoint(live)), flow, connect, None
        )
    assert isinstance(sock, socket.socket)
    with sock:
        assert sock.getpeername() == live.getsockname()
    assert flow.endpoint == str(endpoint(live))
    assert attempts.seen == [(str(closed), "Connection refused"), (str(endpoint(live)), None)]
    assert accepted(live) == 1


async def test_connect_attempts_bound_the_endpoints_tried(live: socket.socket) -> None:
    closed = Endpoint("127.0.0.1", free_port())
    attempts = Attempts()
    rt = runtime(make_config(cluster="connect_attempts = 1"), attempts=attempts)
    flow = new_flow()
    with trio.fail_after(10):
        result = await connect_upstream(
            rt, route_to(rt.config, closed, endpoint(live)), flow, connect, None
        )
    assert result == CloseReason.CONNECT_FAILED
    assert flow.error == f"{closed}: Connection refused"
    assert attempts.seen == [(str(closed), "Connection refused")]
    assert accepted(live) == 0


async def test_every_endpoint_failing_is_listed() -> None:
    first, second = Endpoint("127.0.0.1", free_port()), Endpoint("::1", free_port("::1"))
    rt = runtime(make_config(cluster="connect_attempts = 2"))
    assert not rt.attempt_hook  # nobody observes the attempts: the loop skips the hook
    flow = new_flow()
    with trio.fail_after(10):
        result = await connect_upstream(rt, route_to(rt.config, first, second), flow, connect, None)
    assert result == CloseReason.CONNECT_FAILED
    assert flow.error == f"{first}: Connection refused; {second}: Connection refused"
    assert flow.endpoint is None


async def test_no_endpoint() -> None:
    rt = runtime()
    flow = new_flow()
    route = Route("r", rt.config.clusters["api"], ())
    with trio.fail_after(10):
        assert await connect_upstream(rt, route, flow, connect, None) == (
            CloseReason.CONNECT_FAILED
        )
    assert flow.error == "no endpoint available"


async def test_the_connect_budget_bounds_all_attempts(live: socket.socket) -> None:
    attempts = Attempts()
    config = make_config(
        cluster='connect_attempts = 2\nconnect_timeout = "5s"\nconnect_budget = "300ms"'
    )
    rt = runtime(config, attempts=attempts)
    flow = new_flow()
    with stalled_listener() as stalled, trio.fail_after(10):
        result = await connect_upstream(
            rt, route_to(config, endpoint(stalled), endpoint(live)), flow, connect, None
        )
    assert result == CloseReason.CONNECT_FAILED
    assert flow.error == "connect budget 0.3s spent"
    # The budget ran out during the first attempt: the second endpoint was never tried.
    assert accepted(live) == 0


async def test_a_per_attempt_timeout_moves_on(live: socket.socket) -> None:
    attempts = Attempts()
    config = make_config(cluster='connect_attempts = 2\nconnect_timeout = "200ms"')
    rt = runtime(config, attempts=attempts)
    flow = new_flow()
    with stalled_listener() as stalled, trio.fail_after(10):
        stalled_at = endpoint(stalled)
        sock = await connect_upstream(
            rt, route_to(config, stalled_at, endpoint(live)), flow, connect, None
        )
    assert isinstance(sock, socket.socket)
    sock.close()
    assert attempts.seen == [
        (str(stalled_at), "timed out after 0.2s"),
        (str(endpoint(live)), None),
    ]


async def test_a_reset_right_after_connect_is_not_retried(live: socket.socket) -> None:
    """The backend saw the connection (and may have acted on it): no other endpoint."""
    attempts = Attempts()
    config = make_config(cluster='connect_attempts = 2\nconnect_timeout = "5s"')
    rt = runtime(config, attempts=attempts)
    flow = new_flow()
    result: list[object] = []
    with stalled_listener() as stalled, trio.fail_after(10):
        stalled_at = endpoint(stalled)

        async def run() -> None:
            result.append(
                await connect_upstream(
                    rt, route_to(config, stalled_at, endpoint(live)), flow, connect, None
                )
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            reset_next_handshake(stalled)
    assert result == [CloseReason.BACKEND_RESET]
    assert flow.endpoint == str(stalled_at)
    assert flow.error == "reset by the backend right after connect"
    assert attempts.seen == [(str(stalled_at), "reset by the backend right after connect")]
    assert accepted(live) == 0
