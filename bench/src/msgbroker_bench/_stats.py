"""Small statistics: medians, spreads, latency percentiles, paired ratios."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Spread", "percentiles", "ratio_spread", "spread"]


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and min–max of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    def text(self, fmt: str = "{:,.0f}") -> str:
        if self.n == 0:
            return "—"
        if self.n == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}–{fmt.format(self.high)})"


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def spread(values: Iterable[float]) -> Spread:
    """Median, min and max of the finite values (an empty spread when there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(_median(finite), min(finite), max(finite), len(finite))


def ratio_spread(ours: Sequence[float | None], baseline: Sequence[float | None]) -> Spread:
    """Ratios of paired repetitions (rep *i* of ours ÷ rep *i* of the baseline, measured
    back to back), summarised as median and min–max; unpaired or failed reps are left out."""
    pairs = [a / b for a, b in zip(ours, baseline, strict=False) if a and b and math.isfinite(a) and math.isfinite(b)]
    return spread(pairs)


def percentiles(samples: Sequence[int], points: Sequence[float]) -> list[float]:
    """Percentiles (nearest rank, like HdrHistogram's ``get_value_at_percentile``) of
    ``samples``; NaN for each point when there are no samples."""
    if not samples:
        return [math.nan for _ in points]
    ordered = sorted(samples)
    n = len(ordered)
    out = []
    for p in points:
        rank = max(1, math.ceil(p * n / 100 - 1e-9))  # the epsilon: 99.9 * 1000 / 100 is 999.0000000000001
        out.append(float(ordered[min(rank, n) - 1]))
    return out
