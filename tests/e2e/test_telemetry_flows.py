"""Spans for flows that leave the copy tier, and for UDP sessions, at a real OTLP receiver."""

from __future__ import annotations

import socket

import pytest
import trio

from backends import ScriptedBackend, check_exchange, scripted_exchange
from gwproc import free_port
from otlp_receiver import SPAN_KIND_SERVER, OTLPReceiver, Span

pytestmark = pytest.mark.timeout(90)

ENV = {
    "OTEL_BSP_SCHEDULE_DELAY": "100",
    "OTEL_METRIC_EXPORT_INTERVAL": "300",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_TRACES_SAMPLER": "",
    "OTEL_TRACES_EXPORTER": "",
    "OTEL_METRICS_EXPORTER": "",
}


def server_spans(receiver: OTLPReceiver, n: int) -> list[Span]:
    def ready() -> list[Span] | None:
        spans = [s for s in receiver.spans() if s.kind == SPAN_KIND_SERVER]
        return spans if len(spans) >= n else None

    spans: list[Span] = receiver.wait(ready, what=f"{n} server spans")
    return spans


@pytest.mark.privileged
@pytest.mark.parametrize("tier", ["splice", "sockmap"])
async def test_spliced_connection_span(receiver, nursery, gateway, tier):
    backend = ScriptedBackend()
    bport = await nursery.start(backend.run)
    port = free_port()
    gateway(
        f"""
[[listener]]
name = "public"
bind = "127.0.0.1:{port}"

[[route]]
listener = "public"
cluster = "api"

[cluster.api]
endpoints = ["127.0.0.1:{bport}"]

[plugin.relay]
tiers = ["{tier}", "copy"]
promote_after_bytes = 0
sockmap_for_bulk = true

[telemetry]
exporter = "otlp"
""",
        env={**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint},
    )
    with trio.fail_after(60):
        sent, got = await scripted_exchange("127.0.0.1", port, 3_000_000, 2_000_000, seed=5)
        await check_exchange(backend, 5, sent, got, 2_000_000)
        (span,) = await trio.to_thread.run_sync(server_spans, receiver, 1)
    a = span.attributes
    assert a["l4gw.tier"] == tier and a["l4gw.spliced"] is True
    assert a["l4gw.bytes.from_client"] == sent[0] + 17  # the scripted header
    assert a["l4gw.bytes.to_client"] == 2_000_000
    names = [name for name, _, _ in span.events]
    assert "spliced" in names and names[-1] == "closed"
    assert dict((n, attrs) for n, attrs, _ in span.events)["spliced"]["tier"] == tier


async def udp_echo(*, task_status) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            data, peer = await sock.recvfrom(65536)
            await sock.sendto(b"echo:" + data, peer)


async def test_udp_session_span(receiver, nursery, gateway):
    bport = await nursery.start(udp_echo)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway(
        f"""
[[listener]]
name = "dns"
bind = "127.0.0.1:{port}"
protocol = "udp"
session_idle_timeout = "300ms"

[[route]]
listener = "dns"
cluster = "echo"

[cluster.echo]
endpoints = ["127.0.0.1:{bport}"]

[telemetry]
exporter = "otlp"
""",
        env={**ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint},
    )
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with client, trio.fail_after(30):
        await client.connect(("127.0.0.1", port))
        for i in range(3):
            await client.send(b"q%d" % i)
            assert await client.recv(100) == b"echo:q%d" % i
        client_port = client.getsockname()[1]
        (span,) = await trio.to_thread.run_sync(server_spans, receiver, 1)
    a = span.attributes
    assert span.name == "udp proxy"
    assert a["network.transport"] == "udp"
    assert a["client.port"] == client_port and a["server.port"] == port
    assert a["l4gw.route"] and a["l4gw.endpoint"] == f"127.0.0.1:{bport}"
    assert a["l4gw.bytes.from_client"] == 6 and a["l4gw.bytes.to_client"] == 6 + 3 * 5
    assert a["l4gw.close_reason"] == "idle_timeout"
