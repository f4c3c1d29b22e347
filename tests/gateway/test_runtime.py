"""gateway/runtime.py: the flow ids, the one close record of TCP and UDP, the log budget."""

from __future__ import annotations

import logging
import time

import pytest

from gateway import config as config_mod
from gateway import hookimpl, plugin_manager
from gateway.flow import CloseReason, Flow
from gateway.relay.copy import CopyRelay
from gateway.runtime import LogBudget, Runtime, close_line, held_back, next_flow_id, record_close


class Closed:
    """A plugin that keeps every flow its closed hook sees."""

    def __init__(self) -> None:
        self.flows: list[Flow] = []

    @hookimpl
    def l4gw_connection_closed(self, flow: Flow) -> None:
        assert flow.ended is not None  # the end time is set before the hook
        self.flows.append(flow)


def runtime(
    log_connections: bool = False, budget: LogBudget | None = None
) -> tuple[Runtime, Closed]:
    raw = {
        "gateway": {"log_connections": log_connections},
        "listener": [{"name": "l", "bind": "127.0.0.1:1"}],
        "route": [{"listener": "l", "cluster": "c"}],
        "cluster": {"c": {"endpoints": ["127.0.0.1:2"]}},
    }
    config = config_mod.from_dict(raw, "<test>", {})
    closed = Closed()
    plugins = plugin_manager.load(extra={"closed": closed}, installed=False)
    rt = Runtime(config, plugins, CopyRelay(config.gateway.buffer_size), {})
    if budget is not None:
        rt.budget = budget
    return rt, closed


def flow(transport: str, reason: str, client: tuple[str, int] = ("198.18.0.2", 40000)) -> Flow:
    f = Flow(next_flow_id(), "l", transport, client, ("198.18.2.10", 443))
    f.close_reason = reason
    return f


def test_flow_ids_increase_across_transports():
    tcp = flow("tcp", CloseReason.CLIENT_EOF)
    udp = flow("udp", CloseReason.SESSION_IDLE)
    assert 0 < tcp.id < udp.id < next_flow_id()


def test_a_tcp_failure_is_recorded_once_with_a_warning(caplog: pytest.LogCaptureFixture):
    rt, closed = runtime()
    f = flow("tcp", CloseReason.CONNECT_FAILED, client=("fd00::2", 40000))
    f.route, f.endpoint, f.error = "r", "127.0.0.1:2", "127.0.0.1:2: Connection refused"
    with caplog.at_level(logging.INFO):
        record_close(rt, f)
    assert closed.flows == [f]
    [line] = caplog.records
    assert (line.name, line.levelno) == ("l4gw.conn", logging.WARNING)
    assert line.getMessage().startswith(
        f"conn {f.id} l client=[fd00::2]:40000 dst=198.18.2.10:443 route=r "
        "endpoint=127.0.0.1:2 from_client=0 to_client=0 "
    )
    assert line.getMessage().endswith("ms connect_failed error='127.0.0.1:2: Connection refused'")


def test_a_udp_session_is_recorded_with_its_datagrams_and_drops(
    caplog: pytest.LogCaptureFixture,
):
    rt, closed = runtime(log_connections=True)
    f = flow("udp", CloseReason.SESSION_IDLE)
    f.datagrams_from_client, f.bytes_from_client = 2, 6
    f.datagrams_to_client, f.bytes_to_client = 1, 3
    with caplog.at_level(logging.INFO):
        record_close(rt, f, dropped=4)
    assert closed.flows == [f]
    [line] = caplog.records
    assert (line.name, line.levelno) == ("l4gw.udp", logging.INFO)
    assert f"udp session {f.id} l client=198.18.0.2:40000 " in line.getMessage()
    assert "from_client=2/6B to_client=1/3B dropped=4 " in line.getMessage()
    assert line.getMessage().endswith("ms idle_timeout")


def test_only_failures_are_logged_without_log_connections(caplog: pytest.LogCaptureFixture):
    rt, closed = runtime()
    with caplog.at_level(logging.INFO):
        record_close(rt, flow("tcp", CloseReason.CLIENT_EOF))
        record_close(rt, flow("udp", CloseReason.SESSION_IDLE))
    assert len(closed.flows) == 2  # every close reaches the hook
    assert caplog.records == []


def test_failure_lines_are_bounded_per_listener_and_reason():
    rt, closed = runtime(budget=LogBudget(lines=2, window=60))
    lines = [close_line(rt, flow("tcp", CloseReason.NO_ROUTE)) for _ in range(4)]
    assert lines == [(logging.WARNING, ""), (logging.WARNING, ""), None, None]
    # Keyed by (listener, reason), whatever the transport: another reason has its own.
    assert close_line(rt, flow("udp", CloseReason.REFUSED)) == (logging.WARNING, "")
    assert close_line(rt, flow("udp", CloseReason.NO_ROUTE)) is None


def test_log_budget_holds_back_past_the_budget_and_counts():
    budget = LogBudget(lines=3, window=0.2)
    assert [budget.allow("k") for _ in range(6)] == [0, 0, 0, None, None, None]
    assert budget.allow("other") == 0  # keys have budgets of their own
    time.sleep(0.25)
    assert budget.allow("k") == 3  # the first line of the next window reports the 3
    assert budget.allow("k") == 0
    assert held_back(3) == " (3 more like it not logged)"
    assert held_back(0) == ""


class Opener:
    """Gives each flow a span in ``l4gw_connection_opened`` and has no closed hook."""

    @hookimpl
    def l4gw_connection_opened(self, flow: Flow) -> None:
        flow.span = Span()


class Span:
    def __init__(self) -> None:
        self.attached = False

    def attach(self) -> None:
        self.attached = True

    def detach(self) -> None:
        self.attached = False


def test_without_a_closed_hook_the_close_still_detaches_the_flows_span():
    """Nobody takes ``l4gw_connection_closed``: the record skips the hook call, except
    for a flow with a span, which the closing call detaches (Plugins.closed)."""
    rt, _ = runtime()
    rt = Runtime(
        rt.config,
        plugin_manager.load(extra={"opener": Opener()}, installed=False),
        rt.copy,
        {},
    )
    assert not rt.closed_hook
    f = flow("tcp", CloseReason.CLIENT_EOF)
    rt.plugins.opened(f)
    assert f.span.attached
    record_close(rt, f)
    assert f.ended is not None and not f.span.attached
