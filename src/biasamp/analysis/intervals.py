"""Confidence intervals for a binomial proportion k / n.

Four methods, all returning ``(low, high)`` within [0, 1]; the first three are computed by scipy.stats:

- ``clopper_pearson``: exact; covers with probability >= level for every p (conservative). The seed's choice:
  ``scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")``.
- ``wilson``: score interval without continuity correction, ``proportion_ci(level, method="wilson")``;
  coverage close to nominal on average, dips near p = 0 or 1 at small n.
- ``jeffreys``: equal-tailed Beta(k + 1/2, n - k + 1/2) posterior interval, ``scipy.stats.beta`` quantiles
  (lower 0 at k = 0, upper 1 at k = n); binomtest has no Jeffreys method.
- ``bootstrap``: percentile interval of seeded parametric (binomial) resamples of k / n. It under-covers near
  p = 0 or 1: at p = 0.999, n = 2000 its exact coverage (summed over k, n_boot = 2000) is 0.86 at 95% nominal,
  and at k = 0 or k = n it is the single point k / n. It warns (UserWarning) when k or n - k is at most
  ``BOOTSTRAP_MIN_COUNT`` (5), i.e. k / n is within 5 / n of 0 or 1; use another method there.

k = 0 gives lower 0 and k = n upper 1 (clopper_pearson, wilson, jeffreys); n = 0 gives (nan, nan) for every
method.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
from scipy import stats

from biasamp.errors import UsageError

METHODS = ("clopper_pearson", "wilson", "jeffreys", "bootstrap")
BOOTSTRAP_MIN_COUNT = 5
"""The percentile bootstrap warns when k or n - k is at most this (k / n within 5 / n of 0 or 1)."""


def check_level(level: float) -> float:
    """``level`` as a float in (0, 1), else UsageError naming ``ci_level``."""
    try:
        value = float(level) if not isinstance(level, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise UsageError(f"ci_level={level!r} is not allowed: a number in (0, 1), e.g. 0.95")
    return value


def check_method(method: str) -> str:
    """``method`` if it is one of METHODS, else UsageError naming ``ci_method``."""
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"ci_method={method!r} is not known; allowed: {', '.join(METHODS)}")
    return method


def check_n_boot(n_boot: Any) -> int:
    """``n_boot`` as an int >= 1, else UsageError naming ``n_boot``."""
    whole = isinstance(n_boot, numbers.Real) and not isinstance(n_boot, bool) and float(n_boot).is_integer()
    if not whole or n_boot < 1:
        raise UsageError(f"n_boot={n_boot!r} is not allowed: an integer >= 1 (bootstrap resamples)")
    return int(n_boot)


def _check_counts(k: int, n: int) -> tuple[int, int]:
    for name, value in (("k", k), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, numbers.Real) and float(value).is_integer():
                continue
            raise ValueError(f"{name}={value!r} must be a whole number")
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return k, n


def _binomtest_ci(k: int, n: int, level: float, method: str) -> tuple[float, float]:
    """scipy's ``binomtest(k, n).proportion_ci(level, method)`` as floats, with k = 0 -> lower 0, k = n -> upper 1
    and n = 0 -> (nan, nan) (scipy returns the first two itself and refuses n = 0)."""
    level = check_level(level)
    k, n = _check_counts(k, n)
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method=method)
    low = 0.0 if k == 0 else float(ci.low)
    high = 1.0 if k == n else float(ci.high)
    return low, high


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval: the Beta quantiles B(a/2; k, n-k+1) and B(1-a/2; k+1, n-k).

    ``scipy.stats.binomtest(k, n).proportion_ci(level, method="exact")`` (the seed's choice);
    it covers with probability >= level for every p. n = 0 gives (nan, nan).
    """
    return _binomtest_ci(k, n, level, "exact")


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval: the p with |k/n - p| <= z sqrt(p(1-p)/n), z the two-sided normal quantile.

    ``scipy.stats.binomtest(k, n).proportion_ci(level, method="wilson")`` (no continuity correction), i.e.
    centre (k + z^2/2) / (n + z^2), half-width z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4). n = 0 gives (nan, nan).
    """
    return _binomtest_ci(k, n, level, "wilson")


def jeffreys(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Jeffreys interval: equal-tailed quantiles of Beta(k + 1/2, n - k + 1/2); lower 0 at k = 0, upper 1 at k = n."""
    level = check_level(level)
    k, n = _check_counts(k, n)
    if n == 0:
        return math.nan, math.nan
    alpha = 1.0 - level
    a, b = k + 0.5, n - k + 0.5
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, a, b))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, a, b))
    return low, high


def bootstrap_interval(k: int, n: int, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap: quantiles a/2 and 1 - a/2 of k*/n over ``n_boot`` draws k* ~ Binomial(n, k/n).

    Seeded, so the same (k, n, level, n_boot, seed) always gives the same interval. It under-covers near p = 0
    or 1 (exact coverage 0.86 at p = 0.999, n = 2000, 95% nominal; the point k / n at k = 0 or n): one
    UserWarning per call when min(k, n - k) <= BOOTSTRAP_MIN_COUNT (5), i.e. k / n within 5 / n of 0 or 1.
    """
    level = check_level(level)
    k, n = _check_counts(k, n)
    n_boot = check_n_boot(n_boot)
    if n == 0:
        return math.nan, math.nan
    if min(k, n - k) <= BOOTSTRAP_MIN_COUNT:
        warnings.warn(f"bootstrap interval for k={k} of n={n}: within {BOOTSTRAP_MIN_COUNT} counts of 0 or n the "
                      "percentile bootstrap under-covers (0.86 at p = 0.999, n = 2000 for 95%); prefer "
                      "clopper_pearson, wilson or jeffreys", UserWarning, stacklevel=2)
    alpha = 1.0 - level
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n, k / n, size=int(n_boot)) / n
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def proportion_interval(k: int, n: int, level: float = 0.95, method: str = "clopper_pearson", n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Interval for k / n by ``method`` (one of METHODS); ``n_boot`` and ``seed`` are used by the bootstrap only."""
    method = check_method(method)
    if method == "clopper_pearson":
        return clopper_pearson(k, n, level)
    if method == "wilson":
        return wilson(k, n, level)
    if method == "jeffreys":
        return jeffreys(k, n, level)
    return bootstrap_interval(k, n, level, n_boot=n_boot, seed=seed)
