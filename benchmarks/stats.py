"""Statistics the benchmarks' tables share."""
from __future__ import annotations

import math
from typing import Optional


def median_interval(values: list[float], confidence: float = 0.95) -> Optional[tuple[float, float]]:
    """A distribution-free interval for the median: order statistics k and n+1-k, with k the largest for which
    Binomial(n, 1/2) puts at most (1 - confidence)/2 below k (as a sign test does). None below 6 values, where
    no such k exists at 95%."""
    ordered, n = sorted(values), len(values)
    k, below = 0, 0.0
    while True:
        below += math.comb(n, k) / 2**n  # P(X <= k) after the loop body, with X ~ Binomial(n, 1/2)
        if below > (1 - confidence) / 2:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k >= 1 else None
