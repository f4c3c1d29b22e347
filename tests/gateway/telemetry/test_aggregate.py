"""gateway.telemetry.aggregate: reports of several workers summed, and back to OTel metrics."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, Histogram, InMemoryMetricReader, Sum
from opentelemetry.sdk.resources import Resource

from gateway.telemetry.aggregate import WORKER, cumulative, families, merge, metrics_data

SCOPE = ["l4gw", "1.0", "https://opentelemetry.io/schemas/1.44.0"]


def fam(name: str, kind: str, points: list[list[Any]]) -> dict[str, Any]:
    return {"scope": SCOPE, "name": name, "description": "", "unit": "", "kind": kind,
            "points": points}


def by_name(report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f["name"]: f for f in report}


def test_counters_and_histograms_add_up_gauges_stay_per_worker():
    a = [
        fam("closed", "counter", [[{"l4gw.route": "r"}, 3]]),
        fam("active", "updown", [[{"l4gw.route": "r"}, 1]]),
        fam("healthy", "gauge", [[{"l4gw.endpoint": "e"}, 1]]),
        fam("duration", "histogram", [[{"l4gw.route": "r"}, 2, 0.3, 0.1, 0.2, [0.5], [2, 0]]]),
    ]
    b = [
        fam("closed", "counter", [[{"l4gw.route": "r"}, 4], [{"l4gw.route": "s"}, 1]]),
        fam("active", "updown", [[{"l4gw.route": "r"}, 2]]),
        fam("healthy", "gauge", [[{"l4gw.endpoint": "e"}, 0]]),
        fam("duration", "histogram", [[{"l4gw.route": "r"}, 1, 0.9, 0.9, 0.9, [0.5], [0, 1]]]),
    ]
    merged = by_name(merge([(0, a), (1, b)]))
    assert merged["closed"]["points"] == [[{"l4gw.route": "r"}, 7], [{"l4gw.route": "s"}, 1]]
    assert merged["active"]["points"] == [[{"l4gw.route": "r"}, 3]]
    assert merged["healthy"]["points"] == [
        [{"l4gw.endpoint": "e", WORKER: "0"}, 1],
        [{"l4gw.endpoint": "e", WORKER: "1"}, 0],
    ]
    ((attrs, count, total, low, high, bounds, buckets),) = merged["duration"]["points"]
    assert (count, round(total, 6), low, high, bounds, buckets) == (3, 1.2, 0.1, 0.9, [0.5], [2, 1])
    # The inputs are left as they were (a report is merged at every scrape).
    assert a[0]["points"] == [[{"l4gw.route": "r"}, 3]]


def test_a_restarted_worker_counts_on_from_its_last_report():
    """What the process it replaced reported, plus its own: cumulative kinds only."""
    previous = [
        fam("closed", "counter", [[{}, 10]]),
        fam("active", "updown", [[{}, 5]]),
        fam("healthy", "gauge", [[{}, 1]]),
    ]
    own = [fam("closed", "counter", [[{}, 2]]), fam("active", "updown", [[{}, 1]])]
    merged = by_name(merge([(None, cumulative(previous)), (None, own)]))
    assert merged["closed"]["points"] == [[{}, 12]]
    assert merged["active"]["points"] == [[{}, 1]]  # open connections do not carry over
    assert "healthy" not in merged


def test_sdk_metrics_go_through_and_back():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    meter = provider.get_meter("l4gw.test")
    meter.create_counter("c").add(2, {"a": "x"})
    meter.create_up_down_counter("u").add(-1)
    meter.create_histogram("h").record(0.5, {"a": "y"})
    meter.create_gauge("g").set(7)
    report = families(reader.get_metrics_data())
    kinds = {f["name"]: f["kind"] for f in report}
    assert kinds == {"c": "counter", "u": "updown", "h": "histogram", "g": "gauge"}
    data = metrics_data(merge([(0, report), (1, report)]), Resource.create({}), 1, 2)
    (rm,) = data.resource_metrics
    (sm,) = rm.scope_metrics
    assert sm.scope.name == "l4gw.test"
    out = {m.name: m.data for m in sm.metrics}
    assert isinstance(out["c"], Sum) and out["c"].is_monotonic
    assert [(dict(p.attributes), p.value) for p in out["c"].data_points] == [({"a": "x"}, 4)]
    assert isinstance(out["u"], Sum) and not out["u"].is_monotonic
    assert out["u"].data_points[0].value == -2
    assert isinstance(out["h"], Histogram) and out["h"].data_points[0].count == 2
    assert out["h"].data_points[0].start_time_unix_nano == 1
    assert isinstance(out["g"], Gauge) and len(out["g"].data_points) == 2
    provider.shutdown()
