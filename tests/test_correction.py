"""The oracle-error correction of rho: per-class confusion, its posterior interval's coverage, hand cases.

Coverage is measured by simulation: 2 classes of 1000 generated samples each, a binary bias, 120 labelled
held-out samples per (class, true value) for the oracle's confusion, and the correction's 95% interval
checked against the true rho over seeded replicates. ``python -m tests.test_correction`` prints the table
(method, rho, replicates, coverage, mean estimate bias) for every case; the slow test asserts coverage >= 0.93
for 500 replicates per rho, the default one >= 0.88 for 100 replicates at two rho.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pandas as pd
import pytest

from biasamp.analysis import confusion_counts_for, corrected_rho, per_class_counts_for, rho_model_from_counts
from biasamp.analysis.correction import CI_METHOD, fit_corrected, select_confusion
from biasamp.errors import UsageError

RHOS = (0.5, 0.9, 0.99, 0.995, 0.999)
N_PER_CLASS = 1000
ROWS = 120  # labelled held-out samples per (class, true value)


def binary_confusion(acc0: float, acc1: float) -> np.ndarray:
    """C[i, j] = P(pred j | true i) with accuracy acc0 for value 0 and acc1 for value 1."""
    return np.array([[acc0, 1 - acc0], [1 - acc1, acc1]])


# class k's aligned value is value k; class 0 is "young" (aligned: female = value 0), class 1 "old" (male)
CASES = {
    "acc 0.95": np.stack([binary_confusion(0.95, 0.95)] * 2),
    "acc 0.99": np.stack([binary_confusion(0.99, 0.99)] * 2),
    # BFFHQ-like: female accuracy 0.99 among the young, 0.60 among the old; male 0.95 in both
    "class-dependent": np.stack([binary_confusion(0.99, 0.95), binary_confusion(0.60, 0.95)]),
}


def simulate(rng: np.random.Generator, reps: int, rho: float, conf: np.ndarray, n: int = N_PER_CLASS,
             rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(observed (R, K, V) prediction counts, confusion counts (R, K, V, V)) for true rho in every class."""
    k, v = conf.shape[:2]
    p_true = np.full((k, v), (1 - rho) / (v - 1))
    p_true[np.arange(k), np.arange(k)] = rho
    q = np.einsum("ki,kij->kj", p_true, conf)
    observed = np.stack([rng.multinomial(n, q[c], size=reps) for c in range(k)], axis=1)
    counts = np.stack([np.stack([rng.multinomial(rows, conf[c, i], size=reps) for i in range(v)], axis=1)
                       for c in range(k)], axis=1)
    return observed, counts


def coverage(case: str, rho: float, reps: int, seed: int = 0, confusion: str = "per_class", n_draws: int = 2000,
             chunk: int = 250) -> dict[str, float]:
    """Coverage of the level-0.95 interval and the mean bias of the estimate over ``reps`` seeded replicates."""
    conf = CASES[case]
    rng = np.random.default_rng(seed)
    observed, counts = simulate(rng, reps, rho, conf)
    if confusion == "pooled":
        counts, group = counts.sum(axis=1, keepdims=True), np.zeros(conf.shape[0], dtype=np.int64)
    else:
        group = np.arange(conf.shape[0])
    est, low, high = [], [], []
    for start in range(0, reps, chunk):
        fit = fit_corrected(observed[start:start + chunk], counts[start:start + chunk], group, 0.95, n_draws,
                            seed=seed + start)
        est.append(fit["rho"])
        low.append(fit["low"])
        high.append(fit["high"])
    est, low, high = np.concatenate(est), np.concatenate(low), np.concatenate(high)
    return {"coverage": float(np.mean((low <= rho) & (rho <= high))), "bias": float(np.mean(est) - rho),
            "width": float(np.mean(high - low)), "miss_low": float(np.mean(high < rho)),
            "miss_high": float(np.mean(low > rho))}


def coverage_table(reps: int = 500, rhos=RHOS, cases=tuple(CASES), seed: int = 0) -> pd.DataFrame:
    rows = []
    for case in cases:
        modes = ("per_class", "pooled") if case != "class-dependent" else ("per_class",)
        for mode in modes:
            for rho in rhos:
                start = time.perf_counter()
                res = coverage(case, rho, reps, seed=seed, confusion=mode)
                rows.append({"method": f"{CI_METHOD} ({mode})", "case": case, "rho": rho, "replicates": reps,
                             **res, "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("case, rho", [("acc 0.95", 0.9), ("class-dependent", 0.995)])
def test_interval_covers_in_a_small_fixed_seed_simulation(case, rho):
    res = coverage(case, rho, reps=100, seed=7, n_draws=1000)
    assert res["coverage"] >= 0.88, res


@pytest.mark.slow
@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("case", list(CASES))
def test_interval_covers_at_95_percent_nominal(case, rho):
    res = coverage(case, rho, reps=500, seed=1)
    assert res["coverage"] >= 0.93, res
    if case != "class-dependent":
        pooled = coverage(case, rho, reps=500, seed=1, confusion="pooled")
        assert pooled["coverage"] >= 0.93, pooled


# ---------------------------------------------------------------------------------------------- class-dependent
def tidy_counts(observed: np.ndarray, classes: list[str], values: list[str], attribute: str) -> pd.DataFrame:
    rows = [{"class": c, attribute: v, "valid": True, "count": int(observed[i, j])}
            for i, c in enumerate(classes) for j, v in enumerate(values)]
    return pd.DataFrame(rows, columns=["class", attribute, "valid", "count"])


CLASSES, VALUES = ["young", "old"], ["female", "male"]


def bffhq_like(n: int, rows: int, seed: int | None) -> tuple[pd.DataFrame, dict]:
    """Counts of 2 classes at true rho 0.95 and the oracle's stored confusion (pooled and per class): expected
    counts when ``seed`` is None, else drawn."""
    conf = CASES["class-dependent"]
    p_true = np.array([[0.95, 0.05], [0.05, 0.95]])
    q = np.einsum("ki,kij->kj", p_true, conf)
    if seed is None:
        observed, per_class = np.rint(n * q), np.rint(rows * conf)
    else:
        rng = np.random.default_rng(seed)
        observed = np.stack([rng.multinomial(n, q[c]) for c in range(2)])
        per_class = np.stack([[rng.multinomial(rows, conf[c, i]) for i in range(2)] for c in range(2)])
    # stored in another value order than the counts use: the reader reorders
    flip = per_class[:, ::-1, ::-1].astype(int)
    confusion = {"gender": {"labels": VALUES[::-1], "counts": flip.sum(axis=0).tolist(),
                            "per_class": {c: flip[i].tolist() for i, c in enumerate(CLASSES)}}}
    return tidy_counts(observed, CLASSES, VALUES, "gender"), confusion


def test_class_dependent_confusion_needs_per_class_matrices():
    """Female accuracy 0.99 among the young and 0.60 among the old, true rho 0.95: each class's own matrix
    recovers it, the pooled one over-corrects (towards 0.98)."""
    table, confusion = bffhq_like(10_000, 1000, seed=None)  # expected counts: the MLE is exact
    exact = corrected_rho(table, CLASSES, VALUES, "gender", confusion, n_boot=500)
    assert exact["confusion"] == "per_class" and exact["confusion_note"] == ""
    assert exact["rho_corrected"] == pytest.approx(0.95, abs=1e-9)
    assert [r["rho_corrected"] for r in exact["per_class"]] == pytest.approx([0.95, 0.95], abs=1e-9)
    pooled = corrected_rho(table, CLASSES, VALUES, "gender", confusion, n_boot=500, confusion="pooled")
    assert pooled["confusion"] == "pooled" and pooled["rho_corrected"] > 0.97

    table, confusion = bffhq_like(5000, 500, seed=3)  # drawn counts: the truth within the interval
    res = corrected_rho(table, CLASSES, VALUES, "gender", confusion, n_boot=2000, seed=1)
    pooled = corrected_rho(table, CLASSES, VALUES, "gender", confusion, n_boot=2000, seed=1, confusion="pooled")
    raw = rho_model_from_counts(table, CLASSES, VALUES, "gender")
    assert res["ci_low"] <= 0.95 <= res["ci_high"] and abs(res["rho_corrected"] - 0.95) < 0.01
    assert res["ci_high"] - res["ci_low"] < 0.05
    assert pooled["ci_low"] > 0.95 and pooled["rho_corrected"] > 0.97
    assert raw.ci_high < 0.95  # the raw share misses on the other side
    for r in res["per_class"]:
        assert r["ci_low"] <= 0.95 <= r["ci_high"]


# ---------------------------------------------------------------------------------------------- hand cases
def test_perfect_oracle_changes_nothing():
    table = tidy_counts(np.array([[870, 130], [40, 960]]), CLASSES, VALUES, "gender")
    per_class = np.stack([np.diag([120, 120]), np.diag([120, 120])])
    res = corrected_rho(table, CLASSES, VALUES, "gender", per_class, n_boot=1000)
    assert res["confusion"] == "per_class"
    assert res["rho_corrected"] == pytest.approx(res["rho_raw"], abs=1e-12) and res["rho_raw"] == pytest.approx(0.915)
    assert [r["rho_corrected"] for r in res["per_class"]] == pytest.approx([0.87, 0.96], abs=1e-12)
    # the confusion is known to 120 samples a row, not exactly: the interval is a little wider than the raw one
    raw = rho_model_from_counts(table, CLASSES, VALUES, "gender")
    assert res["ci_low"] < 0.915 < res["ci_high"] and res["ci_high"] - res["ci_low"] >= raw.ci_high - raw.ci_low


def test_known_2x2_inversion():
    """C = [[0.9, 0.1], [0.2, 0.8]], predicted shares (0.3, 0.7): p0 = (0.3 - 0.2) / (0.9 - 0.2) = 1/7; class 1
    predicted (0.55, 0.45): p1 = 1 - (0.55 - 0.2) / 0.7 = 1/2."""
    table = tidy_counts(np.array([[300, 700], [550, 450]]), CLASSES, VALUES, "gender")
    res = corrected_rho(table, CLASSES, VALUES, "gender", [[90, 10], [20, 80]], n_boot=500)
    assert res["confusion"] == "pooled" and res["ci_method"] == "dirichlet_posterior"
    assert [r["rho_corrected"] for r in res["per_class"]] == pytest.approx([1 / 7, 1 / 2], abs=1e-12)
    assert res["rho_corrected"] == pytest.approx((1 / 7 + 1 / 2) / 2, abs=1e-12)
    # per-class matrices that are both the same give the same estimate (the interval differs: 100 counts a row
    # per class instead of 200 pooled)
    same = corrected_rho(table, CLASSES, VALUES, "gender", np.stack([[[45, 5], [10, 40]]] * 2), n_boot=500)
    assert same["confusion"] == "per_class" and same["rho_corrected"] == pytest.approx(res["rho_corrected"])
    assert same["ci_high"] - same["ci_low"] > res["ci_high"] - res["ci_low"]


def test_interval_is_seeded_and_reaches_one_at_the_boundary():
    table = tidy_counts(np.array([[985, 15], [12, 988]]), CLASSES, VALUES, "gender")  # fewer errors than C says
    conf = [[118, 2], [3, 117]]
    res = corrected_rho(table, CLASSES, VALUES, "gender", conf, n_boot=2000, seed=5)
    assert res == corrected_rho(table, CLASSES, VALUES, "gender", conf, n_boot=2000, seed=5)
    assert res["rho_corrected"] == 1.0 and res["ci_high"] == 1.0 and 0.95 < res["ci_low"] < 1.0
    assert res["n_draws"] == 2000 and res["seed"] == 5 and res["ci_level"] == 0.95
    other = corrected_rho(table, CLASSES, VALUES, "gender", conf, n_boot=2000, seed=6)
    assert other["ci_low"] == pytest.approx(res["ci_low"], abs=0.01) and other["ci_low"] != res["ci_low"]


# ---------------------------------------------------------------------------------------------- which confusion
def test_stored_format_is_read_in_value_order():
    _, confusion = bffhq_like(10_000, 1000, seed=None)
    pooled = confusion_counts_for(confusion, "gender", VALUES)
    per_class = per_class_counts_for(confusion, "gender", VALUES)
    assert list(per_class) == CLASSES and (per_class["young"] + per_class["old"]).tolist() == pooled.tolist()
    assert per_class["old"].tolist() == [[600, 400], [50, 950]]  # rows true female, male
    assert per_class_counts_for({"gender": {"labels": VALUES, "counts": pooled.tolist()}}, "gender", VALUES) is None


def test_auto_per_class_pooled_and_their_refusals():
    _, confusion = bffhq_like(10_000, 1000, seed=None)
    counts, group, mode, note = select_confusion(confusion, "gender", VALUES, CLASSES)
    assert mode == "per_class" and group.tolist() == [0, 1] and counts.shape == (2, 2, 2) and note == ""
    counts, group, mode, _ = select_confusion(confusion, "gender", VALUES, CLASSES, "pooled")
    assert mode == "pooled" and group.tolist() == [0, 0] and counts[0].tolist() == [[1590, 410], [100, 1900]]
    with pytest.raises(UsageError, match=r"^confusion='both' is not allowed: use auto .*, per_class or pooled"):
        select_confusion(confusion, "gender", VALUES, CLASSES, "both")

    # an oracle that stored only the pooled matrix (older checkpoints, class oracles)
    old = {"gender": {k: v for k, v in confusion["gender"].items() if k != "per_class"}}
    fallback = select_confusion(old, "gender", VALUES, CLASSES)[2:]
    assert fallback == ("pooled", "the oracle stored no per-class confusion")
    with pytest.raises(UsageError, match="^confusion=per_class: the oracle stored only the confusion pooled"):
        select_confusion(old, "gender", VALUES, CLASSES, "per_class")

    # a class without held-out samples of one true value: its own matrix has an empty row
    holed = {"gender": {**confusion["gender"], "per_class": {"young": [[0, 0], [10, 990]],
                                                             "old": confusion["gender"]["per_class"]["old"]}}}
    _, group, mode, note = select_confusion(holed, "gender", VALUES, CLASSES)
    assert mode == "pooled" and group.tolist() == [0, 0]
    assert note == "class 'young' had no held-out sample of true gender 'male', so its own confusion is unknown there"
    with pytest.raises(UsageError, match="^confusion=per_class: class 'young' had no held-out sample of true gender "
                                         "'male'.*use confusion=pooled"):
        select_confusion(holed, "gender", VALUES, CLASSES, "per_class")
    # ... which does not matter when that class has no samples to correct
    assert select_confusion(holed, "gender", VALUES, CLASSES, needed=[False, True])[2] == "per_class"
    table, _ = bffhq_like(10_000, 1000, seed=None)
    res = corrected_rho(table, CLASSES, VALUES, "gender", holed, n_boot=200)
    assert res["confusion"] == "pooled" and res["confusion_note"] == note

    missing = {"gender": {**confusion["gender"], "per_class": {"young": confusion["gender"]["per_class"]["young"]}}}
    assert select_confusion(missing, "gender", VALUES, CLASSES)[3] == "the oracle has no confusion of class 'old'"
    with pytest.raises(UsageError, match="^confusion=per_class: the oracle has no confusion of class 'old'"):
        corrected_rho(table, CLASSES, VALUES, "gender", missing, confusion="per_class")


# ---------------------------------------------------------------------------------------------- the report
def test_report_tables_name_the_confusion_used(tmp_path):
    from biasamp.analysis import tables
    from tests.test_report import COLOURS, write_sweep

    root = tmp_path / "runs" / "count"
    per_class = {"0": [[240, 10], [5, 245]], "1": [[250, 0], [0, 250]]}
    stored = {"colour": {"labels": COLOURS, "counts": [[490, 10], [5, 495]], "per_class": per_class}}
    a = write_sweep(root, 0.9, confusion=stored)
    b = write_sweep(root, 0.99, confusion={"colour": {"labels": COLOURS, "counts": [[500, 0], [0, 500]]}})
    df = tables.load_results([a, b], n_boot=200)
    results = tables.results_table(df)
    by_rho = results.groupby("rho_data")["confusion"].agg(set).to_dict()
    assert by_rho == {0.9: {"per_class"}, 0.99: {"pooled"}}
    assert results.attrs["confusion"] == ["per_class", "pooled"]
    assert results.attrs["confusion_notes"] == ["the oracle stored no per-class confusion"]
    md = tables.to_markdown(results)
    assert "with the matrix the confusion column names (per_class: each class its own; pooled: one for all)" in md
    assert ("draws from the Dirichlet posterior (prior 1/V per cell: Jeffreys for a binary bias) of both the sample "
            "counts and the confusion counts") in md
    assert "Pooled confusion where the oracle stored no per-class confusion." in md
    assert "bootstrap" not in md
    assert r"per\_class" in tables.to_latex(results, "tab:results")

    pooled = tables.results_table(df, confusion="pooled")
    assert set(pooled["confusion"]) == {"pooled"} and pooled.attrs["confusion_notes"] == []
    assert "one confusion matrix pooled over the classes (confusion: pooled)" in tables.to_markdown(pooled)
    per_class_rows = tables.per_class_table(df[df["rho_data"] == 0.9])
    assert set(per_class_rows["confusion"]) == {"per_class"}
    assert {"rho_corrected", "rho_corrected_low", "rho_corrected_high"} <= set(per_class_rows.columns)
    assert "each class with its own confusion matrix (confusion: per_class)" in tables.to_markdown(per_class_rows)
    with pytest.raises(UsageError, match="^confusion=per_class: the oracle stored only"):
        tables.results_table(df, confusion="per_class")


def test_report_setting_confusion_is_checked(tmp_path):
    from biasamp.analysis.reporting import check_report_config
    from tests.test_report import compose_report, write_sweep

    sweep = write_sweep(tmp_path / "runs" / "count", 0.9)
    assert check_report_config(compose_report([f"sweep={sweep}"])).confusion == "auto"
    assert check_report_config(compose_report([f"sweep={sweep}", "confusion=pooled"])).confusion == "pooled"
    with pytest.raises(UsageError, match=r"^confusion='both' is not allowed: use one of auto, per_class, pooled$"):
        check_report_config(compose_report([f"sweep={sweep}", "confusion=both"]))


def main(argv: list[str]) -> None:
    reps = int(argv[0]) if argv else 500
    table = coverage_table(reps)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"lowest coverage: {table['coverage'].min():.3f}", "ok" if table["coverage"].min() >= 0.93 else "LOW")
    assert not math.isnan(table["coverage"].min())


if __name__ == "__main__":
    main(sys.argv[1:])
