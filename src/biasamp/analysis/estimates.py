"""rho_model from tidy counts.

Counts are a pandas DataFrame in the counts.csv layout: columns ``class``, one column per bias attribute
(value names), ``valid`` and ``count``; the unconditional row has class ``uncond``. Value k of an attribute
is aligned with class k, where the order is given by ``class_names`` and ``value_names``. Several attribute
columns may be present: an estimate for one attribute sums the others out.

Classes and values are compared as strings, so a table read back from CSV (where "0" may become 0) gives the
same numbers as the table that was written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from biasamp.analysis.intervals import check_level, check_method, proportion_interval

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


def _valid_mask(values: pd.Series) -> np.ndarray:
    """The ``valid`` column as booleans; accepts bool, 0/1 and the strings "True"/"False" (as read from CSV)."""
    def one(v: object) -> bool:
        if isinstance(v, str):
            text = v.strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no", ""):
                return False
            raise ValueError(f"valid={v!r} is not a boolean")
        return bool(v)

    return np.array([one(v) for v in values], dtype=bool)


def _check_columns(counts: pd.DataFrame, attribute: str) -> None:
    missing = [c for c in ("class", attribute, "count") if c not in counts.columns]
    if missing:
        raise ValueError(f"counts table lacks column(s) {missing}; has {list(counts.columns)}")


def _select(counts: pd.DataFrame, attribute: str, valid_only: bool, conditional: bool) -> pd.DataFrame:
    """Rows of the conditional classes (or of ``uncond``), optionally only the valid ones."""
    _check_columns(counts, attribute)
    is_uncond = counts["class"].astype(str).to_numpy() == UNCOND
    rows = counts[~is_uncond] if conditional else counts[is_uncond]
    if valid_only:
        if "valid" not in rows.columns:
            raise ValueError("valid_only=True needs a 'valid' column in the counts table")
        rows = rows[_valid_mask(rows["valid"])]
    return rows


def class_value_matrix(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str],
                       attribute: str, valid_only: bool = False) -> np.ndarray:
    """Counts M[c, v] of the conditional rows: class c (class_names order) predicted as value v (value_names order).

    Other attributes (and, unless ``valid_only``, validity) are summed out. A class in the table but not in
    ``class_names``, or a value not in ``value_names``, is a ValueError: it would silently drop samples.
    """
    rows = _select(counts, attribute, valid_only, conditional=True)
    class_index = {str(c): i for i, c in enumerate(class_names)}
    value_index = {str(v): j for j, v in enumerate(value_names)}
    m = np.zeros((len(class_names), len(value_names)), dtype=np.int64)
    for c, v, n in zip(rows["class"].astype(str), rows[attribute].astype(str), rows["count"], strict=True):
        if c not in class_index:
            raise ValueError(f"class {c!r} of the counts table is not in class_names {list(class_names)}")
        if v not in value_index:
            raise ValueError(f"{attribute}={v!r} of the counts table is not in value_names {list(value_names)}")
        m[class_index[c], value_index[v]] += int(n)
    return m


def _aligned_counts(m: np.ndarray) -> np.ndarray:
    """Aligned samples per class: M[c, c] where class c has an own value (c < number of values), else 0."""
    k = min(m.shape)
    aligned = np.zeros(m.shape[0], dtype=np.int64)
    aligned[:k] = np.diagonal(m)[:k]
    return aligned


def rho_model_from_counts(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str],
                          attribute: str, level: float = 0.95, valid_only: bool = False,
                          method: str = "clopper_pearson", n_boot: int = 2000, seed: int = 0) -> RhoEstimate:
    """rho_model = trace(M[:K, :K]) / sum(M[:K]) over the conditional rows, with a ``method`` interval.

    ``valid_only`` restricts to samples the oracle marked valid. ``n_boot`` and ``seed`` serve the bootstrap.
    """
    level = check_level(level)
    method = check_method(method)
    m = class_value_matrix(counts, class_names, value_names, attribute, valid_only)
    n = int(m.sum())
    k = int(_aligned_counts(m).sum())
    low, high = proportion_interval(k, n, level, method, n_boot=n_boot, seed=seed)
    return RhoEstimate(rho_model=k / n if n else math.nan, ci_low=low, ci_high=high, n=n, n_aligned=k,
                       ci_method=method, ci_level=level)


def per_class_rho(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str], attribute: str,
                  level: float = 0.95, method: str = "clopper_pearson", valid_only: bool = False,
                  n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per conditional class (class_names order): class, n, n_aligned, rho, ci_low, ci_high."""
    level = check_level(level)
    method = check_method(method)
    m = class_value_matrix(counts, class_names, value_names, attribute, valid_only)
    aligned = _aligned_counts(m)
    records = []
    for name, row, k in zip(class_names, m, aligned, strict=True):
        n = int(row.sum())
        low, high = proportion_interval(int(k), n, level, method, n_boot=n_boot, seed=seed)
        records.append({"class": str(name), "n": n, "n_aligned": int(k), "rho": int(k) / n if n else math.nan,
                        "ci_low": low, "ci_high": high})
    return pd.DataFrame.from_records(records, columns=["class", "n", "n_aligned", "rho", "ci_low", "ci_high"])


def uncond_marginal(counts: pd.DataFrame, value_names: Sequence[str], attribute: str, level: float = 0.95,
                    method: str = "clopper_pearson", valid_only: bool = False, n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Distribution of ``attribute`` over the unconditional samples: value, count, fraction, ci_low, ci_high.

    One row per value (value_names order); the interval is that of each value's share. No ``uncond`` row in
    the table gives an empty frame with these columns.
    """
    level = check_level(level)
    method = check_method(method)
    columns = ["value", "count", "fraction", "ci_low", "ci_high"]
    rows = _select(counts, attribute, valid_only, conditional=False)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    value_index = {str(v): j for j, v in enumerate(value_names)}
    totals = np.zeros(len(value_names), dtype=np.int64)
    for v, n in zip(rows[attribute].astype(str), rows["count"], strict=True):
        if v not in value_index:
            raise ValueError(f"{attribute}={v!r} of the counts table is not in value_names {list(value_names)}")
        totals[value_index[v]] += int(n)
    total = int(totals.sum())
    records = []
    for name, c in zip(value_names, totals, strict=True):
        low, high = proportion_interval(int(c), total, level, method, n_boot=n_boot, seed=seed)
        records.append({"value": str(name), "count": int(c), "fraction": int(c) / total if total else math.nan,
                        "ci_low": low, "ci_high": high})
    return pd.DataFrame.from_records(records, columns=columns)
