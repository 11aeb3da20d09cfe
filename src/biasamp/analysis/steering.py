"""Reporting h-space steering: the distance of each class's attribute distribution to its target (FD, as Balancing
Act reports it) with an interval, and rho_model against the steering scale (the dose-response figure).

FD_c = ||p_hat_c - t_c||_2 with p_hat_c the oracle's shares of the V bias values among class c's samples (every
sample, as rho_model counts them) and t_c the job's target for class c: the steering target of a
distribution-steered job, the one-hot target value of a sample-steered job, and the uniform distribution for an
unsteered job (the reference Balancing Act measures FD against).

Interval: with V = 2 values the shares are (r, 1 - r), FD = sqrt(2) |r - t|, and the interval is the image of the
Clopper-Pearson interval [lo, hi] of r: [sqrt(2) dist(t, [lo, hi]), sqrt(2) max(|lo - t|, |hi - t|)]; it holds FD
whenever [lo, hi] holds r, so it covers at least as often. With V > 2, every share gets a Clopper-Pearson interval
at level 1 - alpha/V (Bonferroni: all V hold together with probability >= 1 - alpha) and FD's interval is its
smallest and largest value over that box. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from biasamp.analysis.estimates import class_value_matrix
from biasamp.analysis.intervals import clopper_pearson
from biasamp.counting.results import STEER_COLUMNS


def fd_interval(counts: Sequence[int], target: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(FD, low, high) of the counts of V values against a target distribution (see the module docstring)."""
    counts = np.asarray(counts, dtype=np.int64)
    target = np.asarray(target, dtype=np.float64)
    n = int(counts.sum())
    if n == 0:
        return math.nan, math.nan, math.nan
    share = counts / n
    fd = float(np.sqrt(((share - target) ** 2).sum()))  # FD = ‖p̂ − t‖₂
    v = len(counts)
    cells = counts[:1] if v == 2 else counts  # two values: one free share
    alpha = 1.0 - level
    per_cell = 1.0 - (alpha if v == 2 else alpha / v)  # Bonferroni over the V shares when V > 2
    lo_sq = hi_sq = 0.0
    for k, c in enumerate(cells):
        lo, hi = clopper_pearson(int(c), n, per_cell)
        t = float(target[k])
        near = 0.0 if lo <= t <= hi else min(abs(lo - t), abs(hi - t))
        far = max(abs(lo - t), abs(hi - t))
        lo_sq, hi_sq = lo_sq + near**2, hi_sq + far**2
    factor = 2.0 if v == 2 else 1.0  # (r − t)² + ((1 − r) − (1 − t))² = 2 (r − t)²
    return fd, math.sqrt(factor * lo_sq), min(math.sqrt(factor * hi_sq), math.sqrt(2.0))


def class_targets(meta: Any, value_names: Sequence[str]) -> tuple[str, list[list[float]]]:
    """(reference label, per-class target distributions) of a job's meta.json (see the module docstring)."""
    steering = getattr(meta, "steering", None)
    k, v = len(meta.class_names), len(value_names)
    if not steering:
        return "uniform", [[1.0 / v] * v for _ in range(k)]
    if steering["mode"] == "distribution":
        return str(steering["target"]), [[float(x) for x in row] for row in steering["targets"]]
    one = [0.0] * v
    one[int(steering["target_value"])] = 1.0
    return str(steering["target"]), [one] * k


def steering_frame(df: pd.DataFrame) -> pd.DataFrame:
    """results rows with the steering columns filled for unsteered jobs (steer = none, scale 0)."""
    out = df.copy()
    if "steer" not in out.columns:
        out["steer"] = "none"
    out["steer"] = out["steer"].fillna("none").astype(str)
    if "steer_scale" not in out.columns:
        out["steer_scale"] = math.nan
    out.loc[out["steer"] == "none", "steer_scale"] = 0.0
    out["steer_scale"] = out["steer_scale"].astype(float)
    return out


def has_steering(df: pd.DataFrame) -> bool:
    return "steer" in df.columns and bool((df["steer"].fillna("none").astype(str) != "none").any())


def fd_rows(job: Any, level: float) -> list[dict[str, Any]]:
    """Per class of one job: class, rho (the aligned share), its Clopper-Pearson interval, the target's aligned
    share, FD with its interval, the reference, and the invalid share."""
    values, classes = job.value_names, job.class_names
    reference, targets = class_targets(job.meta, values)
    every = class_value_matrix(job.counts, classes, values, job.attribute)  # (K, V), valid and invalid
    valid = class_value_matrix(job.counts, classes, values, job.attribute, valid_only=True)
    rows = []
    for c_index, c in enumerate(classes):
        per_value = [int(x) for x in every[c_index]]
        n = sum(per_value)
        if n == 0:  # a class this job did not count
            continue
        invalid = n - int(valid[c_index].sum())
        aligned = per_value[c_index] if c_index < len(values) else 0
        lo, hi = clopper_pearson(aligned, n, level)
        target = targets[c_index]
        fd, fd_lo, fd_hi = fd_interval(per_value, target, level)
        rows.append({"class": c, "rho": aligned / n, "ci_low": lo, "ci_high": hi,
                     "target_aligned": float(target[c_index]) if c_index < len(target) else math.nan,
                     "fd": fd, "fd_low": fd_lo, "fd_high": fd_hi, "fd_reference": reference, "n": n,
                     "invalid_frac": invalid / n})
    return rows


def dose_response_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the dose-response figure: every steered row, and each unsteered row once per line of steered
    rows (the same steering settings but the scale) counted with the same sampler, guidance and model, at scale 0
    (scale 0 samples exactly what the unsteered sampler does)."""
    frame = steering_frame(df)
    steered = frame[frame["steer"] != "none"]
    plain = frame[frame["steer"] == "none"]
    if steered.empty:
        return steered
    parts = [steered]
    line = [k for k in STEER_COLUMNS if k != "steer_scale" and k in steered.columns]
    setting = [k for k in frame.columns if k.startswith("sampler.") or k in ("guidance", "run", "attribute")]

    def keys(rows: pd.DataFrame) -> pd.Series:
        text = rows[setting].apply(lambda col: col.map(str))  # NaN as "nan": every cell a string
        return text.agg("|".join, axis=1) if setting else pd.Series("", index=rows.index)

    plain_keys = keys(plain)
    for values, group in steered.groupby(line, dropna=False, sort=False):  # one scale-0 point per steered line
        copy = plain[plain_keys.isin(set(keys(group)))].copy()  # counted with the line's sampler, w and model
        for key, value in zip(line, values, strict=True):
            copy[key] = value
        parts.append(copy)
    return pd.concat(parts, ignore_index=True)
