"""The statistics every benchmark reports: percentiles, a summary of a sample, and rates.

Latency figures are order statistics (median, p90, p99), never means: one compile or one page
fault can move a mean by more than the effect being measured.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def percentile(values: list[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Summary:
    """Order statistics of a sample (same unit as the sample)."""

    n: int
    median: float
    p90: float
    p99: float
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarise")
        return cls(
            n=len(values),
            median=statistics.median(values),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            min=min(values),
            max=max(values),
            mean=statistics.fmean(values),
        )

    def scaled(self, factor: float) -> Summary:
        """The same summary in another unit (e.g. seconds -> ms, or per batch -> per image)."""
        return Summary(
            self.n,
            self.median * factor,
            self.p90 * factor,
            self.p99 * factor,
            self.min * factor,
            self.max * factor,
            self.mean * factor,
        )


def rate(count: int, first_start: float, last_end: float) -> float:
    """Events per second over the window from the first start to the last end (0 for an empty window)."""
    window = last_end - first_start
    return count / window if window > 0 else 0.0


def ratio(slower: float, faster: float) -> float:
    """How many times faster `faster` is than `slower` (both durations); nan if `faster` is 0."""
    return slower / faster if faster > 0 else math.nan
