"""InvDiff's Bias metric (Hou et al., KDD 2025; the released ``src/utils/score/bias_score.py``) with an interval.

For one class (InvDiff: one prompt) with oracle counts c_1..c_V of the V bias values, n = sum_k c_k:

    Bias = sum_{i<j} |c_i - c_j| / n / (V (V - 1) / 2),

the mean absolute difference between the shares p_k = c_k / n over the V (V - 1) / 2 pairs: 0 for a balanced
class, 2 / V for a class of one value only (1 with two values). With two values Bias = |c_1 - c_2| / n =
|2 r - 1|, r the share of the first value (rho_model for the aligned value; mitigations.md section 0).

Interval (level 1 - alpha): with V = 2, the image of the Clopper-Pearson interval [lo, hi] of r under
r -> |2 r - 1|: [0, max(|2 lo - 1|, |2 hi - 1|)] when 1/2 lies in [lo, hi], else [min, max] of the two ends; it
holds Bias whenever [lo, hi] holds r. With V > 2 every share gets a Clopper-Pearson interval at level 1 - alpha/V
(Bonferroni: all hold together with probability >= 1 - alpha) and the interval is Bias's smallest and largest value
over that box (the sum-to-one constraint ignored, which only widens it): the largest at a vertex of the box (Bias is
convex), the smallest at p_k = clip(m, lo_k, hi_k) for the best common level m (a convex, piecewise linear function
of m, minimised at one of the box's ends). Torch-free.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from biasamp.analysis.intervals import clopper_pearson


def _pairwise(p: np.ndarray) -> float:
    v = len(p)
    return float(np.abs(p[:, None] - p[None, :]).sum() / 2.0 / (v * (v - 1) / 2.0))


def bias_metric(counts: Sequence[int]) -> float:
    """Bias of one class's counts of V >= 2 values (module docstring); NaN without samples."""
    c = np.asarray(counts, dtype=np.float64)
    if len(c) < 2:
        raise ValueError(f"the Bias metric needs at least 2 bias values, got {len(c)}")
    n = c.sum()
    return math.nan if n == 0 else _pairwise(c / n)


def bias_interval(counts: Sequence[int], level: float = 0.95) -> tuple[float, float, float]:
    """(Bias, low, high) of one class's counts (module docstring)."""
    c = np.asarray(counts, dtype=np.int64)
    value = bias_metric(c)
    n = int(c.sum())
    if n == 0:
        return math.nan, math.nan, math.nan
    alpha = 1.0 - level
    v = len(c)
    if v == 2:
        lo, hi = clopper_pearson(int(c[0]), n, level)
        ends = (abs(2 * lo - 1), abs(2 * hi - 1))
        low = 0.0 if lo <= 0.5 <= hi else min(ends)
        return value, low, max(ends)
    box = [clopper_pearson(int(k), n, 1.0 - alpha / v) for k in c]
    lows = np.array([b[0] for b in box])
    highs = np.array([b[1] for b in box])
    high = max(_pairwise(np.array(vertex)) for vertex in itertools.product(*box))
    levels = np.concatenate([lows, highs])
    low = min(_pairwise(np.clip(m, lows, highs)) for m in levels)
    return value, low, high
