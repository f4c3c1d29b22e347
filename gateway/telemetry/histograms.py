"""Histograms aggregated without the SDK's instruments: bucket arrays, read as OTel metrics.

The SDK's histogram instrument spends several microseconds per measurement and
takes a lock; the recorder (:mod:`gateway.telemetry.recorder`) records each
connection into a :class:`Histogram` (a few list operations on the trio
thread), and the metric readers turn a :meth:`Histogram.snapshot` into an OTel
metric (:func:`histogram_metric`) at each collection, on their own thread.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import Metric

__all__ = ["Attributes", "Histogram", "histogram_metric"]

Attributes = dict[str, Any]


class Histogram:
    """Explicit-bucket histogram series keyed by attribute values (OTel bucket rules:
    bucket i holds ``bounds[i-1] < v <= bounds[i]``; the last is the overflow)."""

    def __init__(
        self, name: str, unit: str, description: str, keys: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.keys = tuple(keys)
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[tuple[Any, ...], list[float]] = {}
        """values -> [count, sum, min, max, bucket 0, ..., bucket n]."""

    def record(self, values: tuple[Any, ...], value: float) -> None:
        s = self.series.get(values)
        if s is None:
            s = self.series[values] = [0, 0.0, value, value] + [0] * (len(self.bounds) + 1)
        s[0] += 1
        s[1] += value
        if value < s[2]:
            s[2] = value
        if value > s[3]:
            s[3] = value
        s[4 + bisect.bisect_left(self.bounds, value)] += 1

    def snapshot(self) -> list[tuple[Attributes, list[float]]]:
        """A copy of every series; safe from another thread than :meth:`record`'s.

        Each copy is one C-level call under the GIL. A series copied halfway
        through a :meth:`record` takes its buckets' sum as its count (its sum,
        min and max may already include that observation).
        """
        out = []
        for k, s in list(self.series.items()):
            series = list(s)
            series[0] = sum(series[4:])
            # An absent value (None, "") is left out: never a "null" attribute.
            attrs = {n: v for n, v in zip(self.keys, k, strict=True) if v is not None and v != ""}
            out.append((attrs, series))
        return out


def histogram_metric(
    h: Histogram, data: list[tuple[Attributes, list[float]]], start: int, now: int
) -> Metric:
    """One cumulative OTel histogram from a :meth:`Histogram.snapshot`."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint, Metric
    from opentelemetry.sdk.metrics.export import Histogram as HistogramData

    points = [
        HistogramDataPoint(
            attributes=attrs,
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=int(s[0]),
            sum=s[1],
            bucket_counts=[int(c) for c in s[4:]],
            explicit_bounds=h.bounds,
            min=s[2],
            max=s[3],
        )
        for attrs, s in data
    ]
    return Metric(
        h.name, h.description, h.unit, HistogramData(points, AggregationTemporality.CUMULATIVE)
    )
