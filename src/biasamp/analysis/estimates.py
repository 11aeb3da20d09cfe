"""rho_model from tidy counts.

Counts are a pandas DataFrame in the counts.csv layout: columns ``class``, one column per bias attribute
(value names), ``valid`` and ``count``; the unconditional row has class ``uncond``. Value k of an attribute
is aligned with class k, where the order is given by ``class_names`` and ``value_names``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from biasamp.analysis.intervals import clopper_pearson

UNCOND = "uncond"


@dataclass(frozen=True)
class RhoEstimate:
    rho_model: float  # aligned / n over the conditional samples
    ci_low: float
    ci_high: float
    n: int  # conditional samples counted
    n_aligned: int
    ci_method: str
    ci_level: float


def rho_model_from_counts(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str],
                          attribute: str, level: float = 0.95, valid_only: bool = False) -> RhoEstimate:
    """rho_model = trace(M[:K, :K]) / sum(M[:K]) over the conditional rows, with a Clopper-Pearson interval.

    ``valid_only`` restricts to samples the oracle marked valid.
    """
    cond = counts[counts["class"] != UNCOND]
    if valid_only:
        cond = cond[cond["valid"].astype(bool)]
    class_index = {str(c): k for k, c in enumerate(class_names)}
    value_index = {str(v): k for k, v in enumerate(value_names)}
    pairs = zip(cond["class"], cond[attribute], strict=True)
    aligned_mask = [class_index[str(c)] == value_index[str(v)] for c, v in pairs]
    n = int(cond["count"].sum())
    k = int(cond.loc[aligned_mask, "count"].sum()) if n else 0
    low, high = clopper_pearson(k, n, level)
    return RhoEstimate(rho_model=k / n if n else float("nan"), ci_low=low, ci_high=high, n=n, n_aligned=k,
                       ci_method="clopper_pearson", ci_level=level)
