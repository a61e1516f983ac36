"""The harness's own arithmetic (no timing is asserted anywhere)."""

from __future__ import annotations

import math

from msgbroker_bench._stats import percentiles, ratio_spread, spread


def test_spread_is_median_min_max_of_finite_values() -> None:
    s = spread([3.0, 1.0, math.nan, 2.0, 10.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 1.0, 10.0, 4)
    assert spread([]).n == 0
    assert spread([]).text() == "—"


def test_ratios_pair_repetitions_and_skip_failed_ones() -> None:
    s = ratio_spread([100.0, None, 300.0], [50.0, 10.0, 100.0])
    assert (s.median, s.low, s.high, s.n) == (2.5, 2.0, 3.0, 2)


def test_percentiles_are_nearest_rank() -> None:
    samples = list(range(1, 1001))
    assert percentiles(samples, (50, 99, 99.9, 100)) == [500.0, 990.0, 999.0, 1000.0]
    assert all(math.isnan(p) for p in percentiles([], (50,)))
