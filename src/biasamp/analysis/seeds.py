"""Between-model uncertainty: rho_model over models that differ only by their training seed.

One trained model is one draw: on another machine, or with another ``seed=``, the same recipe trains a model
whose rho_model can differ by far more than its Clopper-Pearson interval, which covers only the sampling noise
of that one model. The count app writes, on every results.csv row, the training seed (``train_seed``) and the
hash of the run's identity without it (``train_config``). Rows with the same ``train_config``, the same count
setting (every other key but the run, checkpoint and n_per_class; ``n_img`` included: models trained as far) and
two or more distinct training seeds are
**replicates** of one setting; :func:`seed_table` turns each such group into one row:

- ``rho_model``: the mean over seeds of each model's rho_model (every model weighs the same);
- ``between_sd``: the standard deviation of the S per-model estimates (ddof 1): what a reader sees when the
  experiment is rerun with another seed (sampling noise included);
- the interval (:func:`seed_interval`): the hull of (a) the t-interval over seeds,
  mean ± t_{S-1, (1+level)/2} · between_sd / sqrt(S), which carries both the between-model and the sampling
  variation because each estimate has both, and (b) the Clopper-Pearson interval of the pooled counts, the
  sampling variation alone. With S = 3 the S estimates can agree by chance (all at 1.0 near the boundary),
  and (a) alone then collapses to a point; (b) keeps the width the counts themselves imply.

Simulated coverage of the population mean (95% nominal; S = 2, 3, 5 seeds; n = 100, 200, 2,000 samples per
model; mean rho 0.5 to 0.999; between-model sd 0 to 0.03, Beta-distributed, 4,000 replicates each): 0.947 or
more in every case (tests/test_seeds.py repeats a grid of these). The known limit: a strongly skewed
between-model distribution (mean 0.9, sd 0.08, i.e. Beta(12.6, 1.4)) gives 0.91 with 3 to 5 seeds, as any
t-interval over so few values would; more seeds, not another formula, fix that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from biasamp.analysis.intervals import check_level

METHOD = "t_seeds"  # the ci_method of a seed-aggregate row
# columns that tell replicates apart rather than settings
REPLICATE_COLUMNS = ("run", "checkpoint", "train_seed", "n_per_class", "sweep", "job_dir")
# estimate and bookkeeping columns (never a grouping key)
VALUE_COLUMNS = ("n", "n_aligned", "rho_model", "ci_low", "ci_high", "ci_method", "ci_level", "delta", "n_invalid",
                 "rho_model_valid", "nfe", "images_per_s", "class_fidelity", "class_fidelity_low",
                 "class_fidelity_high", "class_fidelity_n", "class_fidelity_k", "delta_low", "delta_high")


def seed_intervals(k: np.ndarray, n: np.ndarray, level: float = 0.95
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`seed_interval` for many settings at once: k and n (..., S) -> mean, between_sd, low, high (...)."""
    level = check_level(level)
    k_arr, n_arr = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(n, dtype=np.int64))
    if k_arr.ndim < 1 or k_arr.shape[-1] < 2:
        raise ValueError(f"need k and n for at least two models, got shape {k_arr.shape}")
    if np.any(n_arr <= 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("every model needs 0 <= k <= n and n > 0")
    rho = k_arr / n_arr
    s = rho.shape[-1]
    mean, sd = rho.mean(axis=-1), rho.std(axis=-1, ddof=1)
    half = float(stats.t.ppf(0.5 + level / 2, s - 1)) * sd / math.sqrt(s)
    # Clopper-Pearson of the pooled counts: Beta quantiles (lower 0 at K = 0, upper 1 at K = N)
    big_k, big_n = k_arr.sum(axis=-1), n_arr.sum(axis=-1)
    alpha = 1.0 - level
    with np.errstate(invalid="ignore"):
        pooled_low = np.where(big_k == 0, 0.0, stats.beta.ppf(alpha / 2, np.maximum(big_k, 1), big_n - big_k + 1))
        pooled_high = np.where(big_k == big_n, 1.0,
                               stats.beta.ppf(1 - alpha / 2, big_k + 1, np.maximum(big_n - big_k, 1)))
    low = np.minimum(np.clip(mean - half, 0.0, 1.0), pooled_low)
    high = np.maximum(np.clip(mean + half, 0.0, 1.0), pooled_high)
    return mean, sd, low, high


def seed_interval(k: Sequence[int], n: Sequence[int], level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, between_sd, low, high) over S >= 2 models with k_s aligned of n_s counted samples each.

    mean = mean of k_s / n_s; between_sd = their standard deviation (ddof 1); the interval is the hull of the
    t-interval mean ± t_{S-1} between_sd / sqrt(S) and the Clopper-Pearson interval of sum k / sum n, clipped to
    [0, 1]. Fewer than two models, or a model with n = 0: ValueError.
    """
    k_arr, n_arr = np.asarray(k), np.asarray(n)
    if k_arr.shape != n_arr.shape or k_arr.ndim != 1:
        raise ValueError(f"need k and n for at least two models, got {k_arr.shape} and {n_arr.shape}")
    return tuple(float(v) for v in seed_intervals(k_arr, n_arr, level))  # type: ignore[return-value]


def _group_keys(df: pd.DataFrame) -> list[str]:
    """The columns that define a setting for replicates: everything but replicate and value columns."""
    return [c for c in df.columns if c not in REPLICATE_COLUMNS and c not in VALUE_COLUMNS]


def _replicate_groups(df: pd.DataFrame) -> list[tuple[pd.DataFrame, pd.Index]]:
    """(one row per seed, every row of the group) for each group of rows with the same train_config, n_img and
    setting and >= 2 distinct training seeds. The same model counted in two sweeps is one replicate, not two:
    its row with the most samples is kept."""
    if "train_seed" not in df.columns or "train_config" not in df.columns:
        return []
    usable = df[df["train_seed"].notna() & df["train_config"].notna() & (df["train_config"].astype(str) != "")]
    if usable.empty:
        return []
    keys = _group_keys(usable)
    marked = usable.assign(**{k: usable[k].astype(object).where(usable[k].notna(), "<missing>") for k in keys})
    groups = []
    for _, index in marked.groupby(keys, sort=False, dropna=False).groups.items():
        rows = usable.loc[index]
        one = rows.sort_values("n", ascending=False, kind="stable").drop_duplicates("train_seed")
        if len(one) >= 2:
            groups.append((one.sort_values("train_seed", kind="stable"), rows.index))
    return groups


def has_replicates(df: pd.DataFrame) -> bool:
    """True when some setting was counted on two or more models that differ only by their training seed."""
    return bool(_replicate_groups(df))


def seed_table(df: pd.DataFrame, level: float | None = None) -> pd.DataFrame:
    """One row per replicated setting (see the module docstring): its setting columns, n_seeds, train_seeds
    ("0,1,2"), rho_data, rho_model (mean over seeds), ci_low, ci_high (the seed-aggregate interval), between_sd,
    rho_min, rho_max, per_seed (each model's rho_model in train_seed order), delta, delta_low, delta_high, n
    (all samples), ci_method ``t_seeds`` and ci_level. ``df``: load_results' frame. Empty (with these columns)
    when nothing is replicated."""
    level = check_level(df.attrs.get("ci_level", 0.95) if level is None else level)
    records = []
    for g, _ in _replicate_groups(df):
        first = g.iloc[0]
        mean, sd, low, high = seed_interval(g["n_aligned"].to_list(), g["n"].to_list(), level)
        rho = (g["n_aligned"] / g["n"]).to_numpy(float)
        rho_data = float(first["rho_data"])
        record = {k: first[k] for k in _group_keys(g)}
        if "n_per_class" in g and g["n_per_class"].nunique(dropna=False) == 1:  # a replicate column, kept if shared
            record["n_per_class"] = first["n_per_class"]
        record.update(n_seeds=len(g), train_seeds=",".join(str(int(s)) for s in g["train_seed"]),
                      rho_model=mean, ci_low=low, ci_high=high, between_sd=sd, rho_min=float(rho.min()),
                      rho_max=float(rho.max()), per_seed=", ".join(f"{r:.3f}" for r in rho),
                      delta=mean - rho_data, delta_low=low - rho_data, delta_high=high - rho_data,
                      n=int(g["n"].sum()), n_aligned=int(g["n_aligned"].sum()), ci_method=METHOD, ci_level=level,
                      sweep=first["sweep"] if "sweep" in g else "", job_dir=";".join(g["job_dir"].astype(str)))
        records.append(record)
    out = pd.DataFrame.from_records(records)
    out.attrs.update(df.attrs)
    out.attrs.update(ci_method=METHOD, ci_level=level)
    return out


def plot_frame(df: pd.DataFrame, aggregate: pd.DataFrame | None = None) -> pd.DataFrame:
    """load_results' frame with every replicated setting replaced by its seed-aggregate row (mean and interval
    over seeds), for figures that draw one line per setting; settings counted on one model keep their row.
    ``aggregate``: seed_table(df) when the caller has it already.

    Where every row knows its training config, the columns that tell models apart (run, checkpoint,
    train_seed) are dropped, so lines are drawn per setting (and per train_config), never per seed.
    """
    groups = _replicate_groups(df)
    if not groups:
        return df
    aggregate = seed_table(df) if aggregate is None else aggregate
    replicated = set().union(*(set(index) for _, index in groups))
    singles = df.drop(index=[i for i in df.index if i in replicated])
    out = pd.concat([aggregate, singles], ignore_index=True, sort=False)
    known = out["train_config"].notna() & (out["train_config"].astype(str) != "")
    if bool(known.all()):
        out = out.drop(columns=[c for c in ("train_seed", "run", "checkpoint") if c in out.columns])
    out.attrs.update(df.attrs)
    out.attrs["seed_aggregate"] = True
    return out
