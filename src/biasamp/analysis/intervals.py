"""Confidence intervals for a binomial proportion k / n."""

from __future__ import annotations

import math

from scipy import stats


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval: the Beta quantiles B(a/2; k, n-k+1) and B(1-a/2; k+1, n-k).

    Same as ``scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")`` (the seed's choice);
    it covers with probability >= level for every p. n = 0 gives (nan, nan).
    """
    if not 0 < level < 1:
        raise ValueError(f"ci_level={level!r} must be in (0, 1)")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high
