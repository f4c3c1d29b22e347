"""The access log in-process: line format, bounded queue under a stalled disk, reopen."""

from __future__ import annotations

import json
import logging
import os
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway import Flow
from gateway.config import ConfigError, from_dict
from l4gw_plugins.accesslog import DEFAULT_FIELDS, SCHEMA, AccessLog, format_line

BASE = """
[[listener]]
name = "public"
bind = "127.0.0.1:1"
"""


def section(text: str) -> dict[str, Any]:
    raw = tomllib.loads(BASE + "[plugin.accesslog]\n" + text)
    return dict(from_dict(raw, "t", {"accesslog": SCHEMA}).plugin("accesslog"))


def closed_flow(n: int = 1, client: tuple[str, int] = ("127.0.0.1", 40000)) -> Flow:
    f = Flow(n, "public", "tcp", client, ("127.0.0.1", 443))
    f.route, f.cluster, f.endpoint = "main", "api", "127.0.0.1:9000"
    f.bytes_from_client, f.bytes_to_client = 1017, 3000
    f.close_reason, f.tier = "client_eof", "copy"
    f.started, f.ended = 1_700_000_000.25, 1_700_000_000.75
    return f


def test_line_has_every_default_field() -> None:
    record = json.loads(format_line(closed_flow()))
    assert list(record) == list(DEFAULT_FIELDS)
    assert record["time"] == "2023-11-14T22:13:20.250Z"
    assert record["client"] == "127.0.0.1:40000"
    assert record["destination"] == "127.0.0.1:443"
    assert (record["bytes_from_client"], record["bytes_to_client"]) == (1017, 3000)
    assert record["duration_ms"] == 500.0
    assert record["spliced"] is False and record["tier"] == "copy"
    assert record["trace_id"] is None and record["refused_by"] is None


def test_ipv6_bracketed_trace_id_and_chosen_fields() -> None:
    f = closed_flow(client=("2001:db8::1", 5555))
    f.set_attribute("l4gw.trace_id", "0af7651916cd43dd8448eb211c80319c")
    f.set_attribute("geo_deny.checked", True)
    f.refused_by, f.refused_rule = "ratelimit", "per_client"
    record = json.loads(format_line(f, ("client", "trace_id", "refused_rule", "attributes")))
    assert record == {
        "client": "[2001:db8::1]:5555",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "refused_rule": "per_client",
        "attributes": {
            "l4gw.trace_id": "0af7651916cd43dd8448eb211c80319c",
            "geo_deny.checked": True,
        },
    }


def test_schema() -> None:
    assert section("")["path"] == ""
    assert section('fields = ["id", "sni"]\n')["fields"] == ("id", "sni")
    with pytest.raises(ConfigError) as err:
        section('fields = ["id", "nope"]\nqueue_size = 0\n')
    problems = "\n".join(err.value.problems)
    assert "plugin.accesslog.fields[1]: unknown field 'nope'" in problems
    assert "plugin.accesslog.queue_size: must be at least 1" in problems


def test_off_by_default() -> None:
    a = AccessLog()
    a.configure(section(""))
    a.record(closed_flow())
    assert a.dropped == 0 and a.written == 0


async def wait_for(condition: Any, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


@pytest.mark.timeout(20)
async def test_writes_reopens_and_flushes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    a = AccessLog()
    a.configure(section(f'path = "{path}"\n'))
    async with trio.open_nursery() as n:
        a.start(n)
        for i in range(3):
            a.record(closed_flow(i))
        await wait_for(lambda: a.written == 3)
        os.rename(path, tmp_path / "access.log.1")
        a.reopen()
        await wait_for(lambda: a.reopened == 1)
        a.record(closed_flow(10))
        await wait_for(lambda: a.written == 4)
        # Queued but not yet written at shutdown: flushed by the shutdown hook.
        a.record(closed_flow(11))
        a.flush()
        n.cancel_scope.cancel()
    old = (tmp_path / "access.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in old] == [0, 1, 2]
    assert [json.loads(line)["id"] for line in new] == [10, 11]


@pytest.mark.timeout(30)
async def test_stalled_disk_drops_lines_without_blocking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO nobody reads stands for a stalled disk: the writer thread blocks
    opening it, the queue fills, lines are dropped and counted, and the event
    loop keeps running; once a reader drains it, writing resumes."""
    caplog.set_level(logging.INFO, "l4gw.accesslog")
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    metric_reader = InMemoryMetricReader()
    a = AccessLog(meter_provider=MeterProvider(metric_readers=[metric_reader]))
    a.configure(section(f'path = "{fifo}"\nqueue_size = 10\n'))
    total = 200
    async with trio.open_nursery() as n:
        a.start(n)
        for i in range(total):
            a.record(closed_flow(i))
            await trio.lowlevel.checkpoint()  # the loop is free: the writer is stuck in its thread
        # The writer thread is stuck opening the FIFO before taking any line.
        assert a.dropped == total - 10
        received: list[bytes] = []

        def drain() -> None:
            with open(fifo, "rb") as reader:
                while True:
                    chunk = reader.read(65536)
                    if not chunk:
                        return
                    received.append(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        await wait_for(lambda: a.written + a.dropped == total)
        await wait_for(lambda: any("were dropped" in r.getMessage() for r in caplog.records))
        a.flush()  # closes the FIFO: the reader sees EOF
        n.cancel_scope.cancel()
    await trio.to_thread.run_sync(reader.join, 5)
    lines = b"".join(received).decode().splitlines()
    assert len(lines) == a.written == total - a.dropped
    assert all(json.loads(line)["close_reason"] == "client_eof" for line in lines)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropping lines" in m for m in messages) == 1
    assert any(f"{a.dropped} lines were dropped" in m for m in messages)
    metrics = {
        m.name: sum(p.value for p in m.data.data_points)
        for rm in metric_reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert metrics == {"l4gw.accesslog.dropped": a.dropped, "l4gw.accesslog.written": a.written}


def test_off_its_closed_hook_is_declared_idle(tmp_path: Path) -> None:
    from gateway.testing import load_plugins, make_config

    a = AccessLog()
    plugins = load_plugins({"accesslog": a})
    table = plugins.configure(make_config("", plugins, configure=False))
    assert table.idle["accesslog"] == {"l4gw_connection_closed"}
    on = make_config(f'[plugin.accesslog]\npath = "{tmp_path}/a.log"\n', plugins, configure=False)
    assert "accesslog" not in plugins.configure(on).idle
