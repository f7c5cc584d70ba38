"""The harness's statistics on synthetic timings."""

from __future__ import annotations

import math

import pytest

from pidserve.bench.stats import Summary, percentile, rate, ratio


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile(values, 101)


def test_summary_of_a_sample_with_one_outlier() -> None:
    # 99 requests at 10 ms and one at 1000 ms: the median ignores it, p99 sees part of it, the mean is skewed.
    values = [10.0] * 99 + [1000.0]
    s = Summary.of(values)
    assert s.n == 100 and s.median == 10.0 and s.p90 == 10.0
    assert s.p99 == pytest.approx(10.0 + 0.01 * 990.0)
    assert s.min == 10.0 and s.max == 1000.0 and s.mean == pytest.approx(19.9)
    with pytest.raises(ValueError):
        Summary.of([])


def test_summary_scales_every_statistic() -> None:
    # a batch of 4 timed at 0.2 s and 0.4 s -> ms per image
    s = Summary.of([0.2, 0.4]).scaled(1e3 / 4)
    assert s.median == pytest.approx(75.0) and s.min == pytest.approx(50.0) and s.max == pytest.approx(100.0)
    assert s.n == 2


def test_rate_and_ratio() -> None:
    assert rate(10, first_start=1.0, last_end=3.0) == 5.0
    assert rate(3, 2.0, 2.0) == 0.0  # an empty window is no rate, not a division error
    assert ratio(300.0, 100.0) == 3.0
    assert math.isnan(ratio(1.0, 0.0))
