"""``[gateway] workers = 2`` seen from the admin endpoint: ``/metrics`` counts every
worker's connections (and keeps counting through a worker's restart), ``/connections``
lists every worker's flows, ``/readyz`` is ready only when every worker is."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from adminhttp import aget
from backends import echo_server, recv_exactly
from gwproc import free_port
from otlp_receiver import OTLPReceiver, _points

pytestmark = pytest.mark.timeout(90)


def config(port: int, admin: int, backend: int) -> str:
    return f"""
[gateway]
workers = 2
drain_timeout = "2s"

[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
name = "echo-route"
listener = "public"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{backend}"]

[admin]
bind = "127.0.0.1:{admin}"
"""


async def metrics(port: int) -> dict[str, Any]:
    status, body = await aget(port, "/metrics")
    assert status == 200, body
    text = body.decode()
    # No attribute anywhere exported as a null value.
    assert not re.search(r'="(null|None)?"', text), re.findall(r'\w+="(?:null|None)?"', text)
    return {f.name: f for f in text_string_to_metric_families(text)}


def closed_total(families: dict[str, Any]) -> float:
    return sum(
        s.value for s in families["l4gw_connection_closed"].samples if s.name.endswith("_total")
    )


def worker_pids(log: str) -> list[int]:
    """Worker pids in index order (the supervisor's log line)."""
    m = re.search(r"supervising 2 workers: (\d+), (\d+)", log)
    assert m, log
    return [int(m.group(1)), int(m.group(2))]


async def echo_once(port: int, seed: int) -> int:
    payload = os.urandom(64) + seed.to_bytes(4, "big")  # non-repeating
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(payload)
        assert await recv_exactly(stream, len(payload)) == payload
    return len(payload)


async def run_connections(port: int, count: int, first: int = 0) -> None:
    limit = trio.CapacityLimiter(20)

    async def one(seed: int) -> None:
        async with limit:
            await echo_once(port, seed)

    async with trio.open_nursery() as n:
        for seed in range(first, first + count):
            n.start_soon(one, seed)


async def wait_closed(admin: int, want: int) -> dict[str, Any]:
    """/metrics once it counts ``want`` closed connections (a close is recorded just
    after the client saw it)."""
    with trio.fail_after(15):
        while True:
            families = await metrics(admin)
            if closed_total(families) >= want:
                return families
            await trio.sleep(0.1)


async def test_every_worker_counted_listed_and_ready(nursery, gateway):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    gw = gateway(config(port, admin, backend), wait_ready=False)
    with trio.fail_after(80):
        text = await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
        pids = worker_pids(text)
        # /readyz: ready only when every worker is. Worker 1 stopped cannot answer.
        os.kill(pids[1], signal.SIGSTOP)
        try:
            status, body = await aget(admin, "/readyz")
            assert status == 503, body
            document = json.loads(body)
            assert document["ready"] is False
            assert [w["worker"] for w in document["workers"]] == [0, 1]
            assert document["workers"][0]["ready"] is True
            assert document["workers"][1] == {"worker": 1, "ready": False, "error": "no answer"}
        finally:
            os.kill(pids[1], signal.SIGCONT)
        status, body = await aget(admin, "/readyz")
        assert status == 200, body
        assert all(w["ready"] for w in json.loads(body)["workers"])

        # /connections: open flows of both workers while they are open.
        held = []
        try:
            for _ in range(40):
                held.append(await trio.open_tcp_stream("127.0.0.1", port))
            for i, stream in enumerate(held):
                await stream.send_all(b"held %d" % i)
                assert await recv_exactly(stream, len(b"held %d" % i)) == b"held %d" % i
            status, body = await aget(admin, "/connections")
            assert status == 200
            document = json.loads(body)
            assert document["count"] == 40 and document["workers_missing"] == []
            # The kernel spreads them by a hash of their addresses: all 40 in one
            # worker has p = 2**-39.
            assert {r["worker"] for r in document["connections"]} == {0, 1}
            assert all(r["route"] == "echo-route" for r in document["connections"])
            families = await metrics(admin)
            active = families["l4gw_connection_active"].samples
            assert sum(s.value for s in active) == 40
        finally:
            for stream in held:
                await stream.aclose()

        await run_connections(port, 360)
        families = await wait_closed(admin, 400)
        assert closed_total(families) == 400
        for s in families["l4gw_connection_closed"].samples:
            if s.name.endswith("_total"):
                assert s.labels["l4gw_listener"] == "public"
                assert s.labels["l4gw_route"] == "echo-route"
                assert s.labels["l4gw_cluster"] == "echo"
        durations = families["l4gw_connection_duration_seconds"].samples
        assert sum(s.value for s in durations if s.name.endswith("_count")) == 400
        io = families["l4gw_io_bytes"].samples
        assert {s.labels["l4gw_cluster"] for s in io} == {"echo"}
        received = sum(s.value for s in io if s.labels["network_io_direction"] == "receive")
        assert received == sum(len(b"held %d" % i) for i in range(40)) + 360 * 68
        connects = families["l4gw_upstream_connect_duration_seconds"].samples
        counts = [s for s in connects if s.name.endswith("_count")]
        assert sum(s.value for s in counts) == 400
        assert all("error_type" not in s.labels for s in counts)  # every connect succeeded
        assert sum(s.value for s in families["l4gw_connection_active"].samples) == 0
        # process_* of each worker, by l4gw_worker.
        for name in ("process_cpu_seconds", "process_open_fds", "process_max_fds"):
            assert {s.labels["l4gw_worker"] for s in families[name].samples} == {"0", "1"}


async def test_a_restarted_worker_takes_no_count_back(nursery, gateway):
    backend = await nursery.start(echo_server)
    port, admin = free_port(), free_port()
    gw = gateway(config(port, admin, backend), wait_ready=False)
    with trio.fail_after(80):
        text = await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
        pids = worker_pids(text)
        await run_connections(port, 100)
        assert closed_total(await wait_closed(admin, 100)) == 100

        seen = [100.0]
        cpu: dict[str, list[float]] = {"0": [], "1": []}

        def note_cpu(families: dict[str, Any]) -> None:
            for sample in families["process_cpu_seconds"].samples:
                cpu[sample.labels["l4gw_worker"]].append(sample.value)

        async def scrape_until(ready_lines: int) -> None:
            """Scrape while a worker restarts: the count never goes back."""
            while gw.log.count("l4gw: ready") < ready_lines:
                try:
                    families = await metrics(admin)
                except (OSError, AssertionError, http.client.HTTPException):
                    await trio.sleep(0.05)  # worker 0 itself is restarting
                    continue
                value = closed_total(families)
                note_cpu(families)
                assert value >= seen[-1], seen
                seen.append(value)
                await trio.sleep(0.05)

        os.kill(pids[1], signal.SIGKILL)  # the worker that answers worker 0
        await scrape_until(3)
        assert closed_total(await wait_closed(admin, 100)) == 100
        os.kill(pids[0], signal.SIGKILL)  # the worker that serves /metrics
        await scrape_until(4)
        assert closed_total(await wait_closed(admin, 100)) == 100
        await run_connections(port, 50, first=100)
        assert closed_total(await wait_closed(admin, 150)) == 150
        assert seen == sorted(seen)
        # A worker's CPU time carries over its restarts too.
        assert all(values == sorted(values) for values in cpu.values()), cpu


async def test_otlp_metrics_are_every_workers_sum_from_worker_zero(nursery, gateway):
    """The OTLP export is worker 0's, of every worker: the other workers export nothing
    themselves (a sum per export, one resource)."""
    receiver = OTLPReceiver()
    try:
        backend = await nursery.start(echo_server)
        port, admin = free_port(), free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_TRACES_SAMPLER": "",
        }
        gw = gateway(config(port, admin, backend), wait_ready=False, env=env)
        with trio.fail_after(60):
            await trio.to_thread.run_sync(gw.wait_log, r"l4gw: ready", 15, 2)
            await run_connections(port, 64)

            def closed() -> float:
                return sum(p.value for p in receiver.latest_points("l4gw.connection.closed"))

            await trio.to_thread.run_sync(
                lambda: receiver.wait(lambda: closed() == 64, what="closed == 64")
            )
            points = receiver.latest_points("l4gw.connection.closed")
            assert {p.attributes["l4gw.route"] for p in points} == {"echo-route"}
            assert all(None not in p.attributes.values() for p in points)
            # Every later export is the whole sum: no worker exports a part of its own.
            before = len(receiver.metric_requests)
            await trio.to_thread.run_sync(
                lambda: receiver.wait(lambda: len(receiver.metric_requests) >= before + 3)
            )
            later = list(receiver.metric_requests)[before:]
            sums = [sum(p.value for p in _points(r, "l4gw.connection.closed")) for r in later]
            assert sums and set(sums) == {64}, sums
            # Gauges stay per worker (the rate-limit plugin's, here).
            workers = {
                p.attributes.get("l4gw.worker")
                for r in later[-1:]
                for name in ("l4gw.ratelimit.buckets", "l4gw.ratelimit.buckets.limit")
                for p in _points(r, name)
            }
            assert workers == {"0", "1"}
    finally:
        receiver.stop()
