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
from typing import Any

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



def bias_rows(job: Any, level: float = 0.95) -> list[dict[str, Any]]:
    """Per class of one count job (analysis.tables.Job): class, rho (the aligned share) with its Clopper-Pearson
    interval, Bias with its interval, n and the invalid share, every sample counted with the oracle's value for it,
    invalid ones too (as rho_model counts them; InvDiff's classifier gives every image a value), so that with two
    values Bias = |2 rho - 1|; then, with more
    than one class, a row ``mean``: rho of all the job's samples (rho_model, with the results table's Clopper-Pearson
    interval of the pooled counts) and the mean over the classes of Bias (InvDiff's summary over prompts) with the
    mean of the classes' Bias bounds at level 1 - alpha/K (Bonferroni over the K classes: all hold together with
    probability >= 1 - alpha, and then so does their mean)."""
    from biasamp.analysis.estimates import class_value_matrix

    classes, values = job.class_names, job.value_names
    every = class_value_matrix(job.counts, classes, values, job.attribute)
    valid = class_value_matrix(job.counts, classes, values, job.attribute, valid_only=True)
    counted = [c for c in range(len(classes)) if every[c].sum() > 0]  # classes this job counted
    wide_level = 1.0 - (1.0 - level) / max(len(counted), 1)
    rows, wide, n_aligned = [], [], 0
    for c in counted:
        n = int(every[c].sum())
        aligned = int(every[c, c]) if c < len(values) else 0
        lo, hi = clopper_pearson(aligned, n, level)
        bias, b_lo, b_hi = bias_interval(every[c], level)
        rows.append({"class": classes[c], "rho": aligned / n, "ci_low": lo, "ci_high": hi, "bias": bias,
                     "bias_low": b_lo, "bias_high": b_hi, "n": n, "invalid_frac": (n - int(valid[c].sum())) / n})
        wide.append(bias_interval(every[c], wide_level)[1:])
        n_aligned += aligned
    if len(rows) > 1:
        bounds = np.mean(np.array(wide, dtype=np.float64), axis=0)
        n_all = sum(r["n"] for r in rows)
        lo, hi = clopper_pearson(n_aligned, n_all, level)
        rows.append({"class": "mean", "rho": n_aligned / n_all, "ci_low": lo, "ci_high": hi,
                     "bias": float(np.mean([r["bias"] for r in rows])), "bias_low": float(bounds[0]),
                     "bias_high": float(bounds[1]), "n": n_all,
                     "invalid_frac": sum(r["invalid_frac"] * r["n"] for r in rows) / n_all})
    return rows
