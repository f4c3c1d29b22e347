"""The shield's metrics: read from the table and the kernel at collection, by worker 0 only."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from gateway.shield import metrics, table

from shieldtable import installed


class FakeKernel:
    """The kernel map's counters (tests/gateway/shield/test_table.py has the whole stand-in)."""

    mode = "tc"

    def __init__(self) -> None:
        self.drop_counts: dict[Any, int] = {}

    def put(self, net: Any, deadline_ns: int) -> None:
        pass

    def delete(self, net: Any) -> None:
        pass

    def drops(self, net: Any) -> int:
        return self.drop_counts.get(net, 0)

    def counters(self) -> tuple[int, int]:
        return (10, 2)

    def set_ports(self, tcp_ports: Any, udp_ports: Any) -> None:
        pass


@pytest.fixture
def shield() -> Iterator[table.Shield]:
    with installed(table.Shield(FakeKernel())) as fresh:
        yield fresh


def collect(reader: InMemoryMetricReader) -> dict[tuple[str, str], Any]:
    out = {}
    data = reader.get_metrics_data()
    if data is None:  # no instrument had a point
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    label = next(iter(point.attributes.values()), "")
                    out[(metric.name, str(label))] = point.value
    return out


def test_metrics_of_the_reporting_worker(shield: table.Shield) -> None:
    reader = InMemoryMetricReader()
    metrics.register(MeterProvider(metric_readers=[reader]).get_meter("test"))
    kernel = shield.kernel
    assert isinstance(kernel, FakeKernel)
    shield.add("192.0.2.1", 60, "flood", source="ratelimit")
    shield.add("198.51.100.0/24", None, "acl deny", source="acl", static=True)
    kernel.drop_counts[ip_network("192.0.2.1/32")] = 5
    kernel.drop_counts[ip_network("198.51.100.0/24")] = 2
    shield.remove("192.0.2.1")  # its 5 drops stay counted
    got = collect(reader)
    assert got[("l4gw.shield.entries", "")] == 1
    assert got[("l4gw.shield.changes", "add")] == 2
    assert got[("l4gw.shield.changes", "remove")] == 1
    assert got[("l4gw.shield.changes", "evict")] == 0
    assert got[("l4gw.shield.drops", "ratelimit")] == 5
    assert got[("l4gw.shield.drops", "acl")] == 2
    assert got[("l4gw.shield.packets", "passed")] == 10
    assert got[("l4gw.shield.packets", "dropped")] == 2

    shield.reporter = False  # another worker: no points, so a sum over workers counts once
    reader2 = InMemoryMetricReader()
    metrics.register(MeterProvider(metric_readers=[reader2]).get_meter("test"))
    assert collect(reader2) == {}
