"""Metrics of every worker as one (``[gateway] workers > 1``): reports as plain values,
their sum, and the sum as OpenTelemetry metrics again.

Worker 0 serves ``/metrics`` and exports OTLP metrics for the whole gateway: at
each collection it asks the other workers for their reports
(:mod:`gateway.peers`) and merges them with its own. Nothing of this runs per
connection: a report is made only when a collection asks for it.

Rules kept here:

* **A report is plain JSON** (:func:`families`): per metric its scope, name,
  unit, kind and points, each point's attributes as a dict.
* **Cumulative kinds add up; live kinds do not carry over.** Counters and
  histograms of all workers are summed series by series, and so is a
  worker's previous report (the process it replaced, :func:`cumulative`):
  that is what keeps a counter from going backwards when a worker restarts.
  Up-down counters (open connections) are summed over the workers alive
  now; gauges stay per worker, with an ``l4gw.worker`` attribute, since a
  sum of health states or ratios means nothing.
* **Nothing else changes**: names, units, descriptions and attribute names are
  those the workers recorded; every series starts when the supervisor did.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricsData
    from opentelemetry.sdk.resources import Resource

__all__ = ["COUNTER", "GAUGE", "HISTOGRAM", "UPDOWN", "WORKER", "cumulative", "families", "merge"]

COUNTER, UPDOWN, GAUGE, HISTOGRAM = "counter", "updown", "gauge", "histogram"
WORKER = "l4gw.worker"
"""The attribute naming the worker of a gauge's point (its index)."""

Family = dict[str, Any]
"""``{"scope": [name, version, schema_url], "name", "description", "unit", "kind",
"points"}``; a point is ``[attributes, value]``, or for a histogram ``[attributes,
count, sum, min, max, bounds, bucket counts]``."""


def families(data: MetricsData | None) -> list[Family]:
    """The metrics of one collection as plain values."""
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    out: list[Family] = []
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            scope = [sm.scope.name, sm.scope.version or "", sm.scope.schema_url or ""]
            for metric in sm.metrics:
                d = metric.data
                points: list[list[Any]] = []
                if isinstance(d, Histogram):
                    kind = HISTOGRAM
                    for hp in d.data_points:
                        points.append(
                            [
                                dict(hp.attributes or {}),
                                hp.count,
                                hp.sum,
                                hp.min,
                                hp.max,
                                list(hp.explicit_bounds),
                                list(hp.bucket_counts),
                            ]
                        )
                elif isinstance(d, Sum):
                    kind = COUNTER if d.is_monotonic else UPDOWN
                    points = [[dict(p.attributes or {}), p.value] for p in d.data_points]
                elif isinstance(d, Gauge):
                    kind = GAUGE
                    points = [[dict(p.attributes or {}), p.value] for p in d.data_points]
                else:  # exponential histograms: none of the gateway's
                    continue
                out.append(
                    {
                        "scope": scope,
                        "name": metric.name,
                        "description": metric.description or "",
                        "unit": metric.unit or "",
                        "kind": kind,
                        "points": points,
                    }
                )
    return out


def cumulative(report: Iterable[Family]) -> list[Family]:
    """The counters and histograms of a report: what carries over to the process
    that replaces a worker, or stands for a worker that does not answer."""
    return [f for f in report if f["kind"] in (COUNTER, HISTOGRAM)]


def _key(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, sort_keys=True, default=str)


def merge(reports: Sequence[tuple[int | None, Iterable[Family]]]) -> list[Family]:
    """The sum of reports (rule 2).

    Args:
        reports: (worker index, families); a gauge's points get the index as
            :data:`WORKER` unless it is None (the reports of one worker).
    """
    merged: dict[tuple[str, str], Family] = {}
    series: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for worker, report in reports:
        for family in report:
            fkey = (family["scope"][0], family["name"])
            if fkey not in merged:
                merged[fkey] = {**family, "points": []}
                series[fkey] = {}
            target = merged[fkey]
            points = series[fkey]
            kind = target["kind"]
            for point in family["points"]:
                attributes = dict(point[0])
                if kind == GAUGE and worker is not None:
                    attributes[WORKER] = str(worker)
                key = _key(attributes)
                have = points.get(key)
                if have is None:
                    points[key] = [attributes, *point[1:]]
                    continue
                if kind == GAUGE:
                    have[1] = point[1]
                elif kind == HISTOGRAM:
                    if list(have[5]) != list(point[5]):
                        continue  # other bounds: cannot be summed (none of the gateway's)
                    have[1] += point[1]
                    have[2] += point[2]
                    have[3] = min(have[3], point[3])
                    have[4] = max(have[4], point[4])
                    have[6] = [a + b for a, b in zip(have[6], point[6], strict=True)]
                else:
                    have[1] += point[1]
    for fkey, family in merged.items():
        family["points"] = list(series[fkey].values())
    return list(merged.values())


def metrics_data(
    report: Iterable[Family], resource: Resource, start_ns: int, now_ns: int
) -> MetricsData:
    """A report as the OpenTelemetry metrics the readers and exporters take."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative_ = AggregationTemporality.CUMULATIVE
    scopes: dict[tuple[str, str, str], list[Metric]] = {}
    for family in report:
        kind = family["kind"]
        data: Sum | Gauge | Histogram
        if kind == HISTOGRAM:
            data = Histogram(
                [
                    HistogramDataPoint(
                        attributes=p[0],
                        start_time_unix_nano=start_ns,
                        time_unix_nano=now_ns,
                        count=int(p[1]),
                        sum=p[2],
                        bucket_counts=[int(c) for c in p[6]],
                        explicit_bounds=[float(b) for b in p[5]],
                        min=p[3],
                        max=p[4],
                    )
                    for p in family["points"]
                ],
                cumulative_,
            )
        else:
            points = [NumberDataPoint(p[0], start_ns, now_ns, p[1]) for p in family["points"]]
            data = Gauge(points) if kind == GAUGE else Sum(points, cumulative_, kind == COUNTER)
        metric = Metric(family["name"], family["description"], family["unit"], data)
        name, version, url = family["scope"]
        scopes.setdefault((name, version, url), []).append(metric)
    scope_metrics = [
        ScopeMetrics(InstrumentationScope(name, version or None, url or None), metrics, url)
        for (name, version, url), metrics in scopes.items()
    ]
    return MetricsData([ResourceMetrics(resource, scope_metrics, "")])
