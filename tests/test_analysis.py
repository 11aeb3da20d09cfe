"""biasamp.analysis: intervals, rho_model from tidy counts, oracle-error correction (CPU, seeded, fast)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from biasamp.analysis import (
    METHODS,
    RhoEstimate,
    bootstrap_interval,
    clopper_pearson,
    confusion_counts_for,
    confusion_matrix,
    correct_distribution,
    corrected_rho,
    jeffreys,
    per_class_rho,
    proportion_interval,
    rho_model_from_counts,
    uncond_marginal,
    wilson,
)
from biasamp.errors import UsageError

GRID_P = (0.05, 0.5, 0.9, 0.99)
GRID_N = (50, 1000)


def exact_coverage(p: float, n: int, method: str, level: float = 0.95) -> float:
    """P_p(p in interval(K)) for K ~ Binomial(n, p), summed over k (no Monte-Carlo error)."""
    ks = np.arange(n + 1)
    pmf = stats.binom.pmf(ks, n, p)
    total = 0.0
    for k in ks[pmf > 1e-15]:
        low, high = proportion_interval(int(k), n, level, method)
        if low <= p <= high:
            total += pmf[k]
    return total


# ---------------------------------------------------------------------------------------------- intervals


def test_clopper_pearson_covers_at_least_nominal_everywhere():
    for n in GRID_N:
        for p in GRID_P:
            assert exact_coverage(p, n, "clopper_pearson") >= 0.95 - 1e-12, (p, n)
    # and between the grid points too, where it is least conservative
    for p in np.linspace(0.01, 0.99, 25):
        assert exact_coverage(float(p), 40, "clopper_pearson") >= 0.95 - 1e-12


def test_clopper_pearson_coverage_by_simulation():
    rng = np.random.default_rng(1)
    for n in GRID_N:
        for p in GRID_P:
            ks = rng.binomial(n, p, size=2000)
            bounds = {int(k): clopper_pearson(int(k), n) for k in np.unique(ks)}
            hit = np.mean([bounds[int(k)][0] <= p <= bounds[int(k)][1] for k in ks])
            assert hit >= 0.94, (p, n, hit)


def test_wilson_and_jeffreys_near_nominal():
    for method in ("wilson", "jeffreys"):
        covs = {(p, n): exact_coverage(p, n, method) for n in GRID_N for p in GRID_P}
        for p in GRID_P:  # large n: within a point or two of 95% (and never the conservative 97%+ of CP at 0.5)
            assert 0.94 <= covs[(p, 1000)] <= 0.965, (method, p, covs[(p, 1000)])
        # small n: their known dips near the boundary (Brown, Cai & DasGupta 2001) stay within ~7 points
        assert min(covs[(p, 50)] for p in GRID_P) >= 0.88, (method, covs)
        assert np.mean([covs[(p, 50)] for p in GRID_P]) >= 0.93, (method, covs)
    # the dips are where theory puts them: Wilson misses p = 0.99 at k = 48 of 50, Jeffreys p = 0.05 at k = 0
    assert exact_coverage(0.99, 50, "wilson") == pytest.approx(stats.binom.sf(48, 50, 0.99), abs=1e-12)
    assert jeffreys(0, 50)[1] < 0.05


@pytest.mark.filterwarnings("ignore:bootstrap interval for k=")  # p = 0.99 reaches k within 5 of n
def test_bootstrap_reasonable_at_n_1000():
    for p in GRID_P:
        assert exact_coverage(p, 1000, "bootstrap") >= 0.93, p
    # percentile bootstrap ~ normal approximation at large n
    low, high = bootstrap_interval(500, 1000, n_boot=4000, seed=3)
    half = 1.96 * math.sqrt(0.25 / 1000)
    assert low == pytest.approx(0.5 - half, abs=0.004)
    assert high == pytest.approx(0.5 + half, abs=0.004)


def test_clopper_pearson_equals_scipy_exact():
    for n in (1, 2, 7, 50, 333, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ref = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
            low, high = clopper_pearson(k, n)
            assert low == pytest.approx(ref.low, abs=1e-12) and high == pytest.approx(ref.high, abs=1e-12)
            ref90 = stats.binomtest(k, n).proportion_ci(0.9, method="exact")
            assert clopper_pearson(k, n, 0.9) == pytest.approx((ref90.low, ref90.high), abs=1e-12)


def test_wilson_hand_values():
    # closed form by hand: z = 1.959964, k = 3, n = 20
    z = 1.959963984540054
    centre = (3 + z * z / 2) / (20 + z * z)
    half = z / (20 + z * z) * math.sqrt(3 * 17 / 20 + z * z / 4)
    assert wilson(3, 20) == pytest.approx((centre - half, centre + half), abs=1e-12)
    # at the edges the closed form collapses: k = 0 gives upper z^2 / (n + z^2), k = n lower n / (n + z^2)
    assert wilson(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)), abs=1e-12)
    assert wilson(10, 10)[0] == pytest.approx(10 / (10 + z * z), abs=1e-12)
    # the closed form to 6 places: (3, 20) -> centre 0.206394, half 0.154025; (48, 50) -> upper 0.988961
    assert wilson(3, 20) == pytest.approx((0.052369, 0.360419), abs=2e-6)
    assert wilson(48, 50)[1] == pytest.approx(0.988961, abs=2e-6)
    assert wilson(10, 10)[1] == 1.0
    # the score interval is the set of p whose score test accepts: its ends solve |k/n - p| = z sqrt(p(1-p)/n)
    for k, n in ((3, 20), (40, 50), (1, 1000)):
        for end in wilson(k, n):
            assert abs(k / n - end) == pytest.approx(z * math.sqrt(end * (1 - end) / n), rel=1e-9)


def wilson_by_hand(k: int, n: int, level: float) -> tuple[float, float]:
    """Wilson (1927) score interval without continuity correction, as Brown, Cai & DasGupta (2001) eq. 4 write it:
    centre (k + z^2/2) / (n + z^2), half-width z sqrt(n) / (n + z^2) sqrt(p_hat (1 - p_hat) + z^2 / (4 n))."""
    z = stats.norm.ppf(1 - (1 - level) / 2)
    p_hat = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p_hat * (1 - p_hat) + z * z / (4 * n))
    return centre - half, centre + half


def test_wilson_is_the_closed_form_score_interval():
    for n in (1, 2, 7, 50, 333, 1000, 10**5):
        for k in sorted({0, 1, n // 7, n // 2, n - 1, n}):
            for level in (0.8, 0.95, 0.99):
                low, high = wilson(k, n, level)
                assert isinstance(low, float) and isinstance(high, float)
                assert (low, high) == pytest.approx(wilson_by_hand(k, n, level), abs=1e-12), (k, n, level)
    # the edges exactly: lower 0 at k = 0 (the closed form gives 0 up to round-off), upper 1 at k = n
    assert wilson(0, 30)[0] == 0.0 and wilson(30, 30)[1] == 1.0


def test_clopper_pearson_is_the_beta_quantile_interval():
    # Clopper & Pearson (1934): lower = Beta(a/2; k, n - k + 1), upper = Beta(1 - a/2; k + 1, n - k)
    for n in (1, 2, 7, 50, 333, 1000):
        for k in sorted({1, n // 3, n // 2, n - 1}):
            if not 0 < k < n:
                continue
            for level in (0.9, 0.95):
                a = 1 - level
                by_hand = (stats.beta.ppf(a / 2, k, n - k + 1), stats.beta.ppf(1 - a / 2, k + 1, n - k))
                assert clopper_pearson(k, n, level) == pytest.approx(by_hand, abs=1e-11), (k, n, level)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12))  # (a/2)^(1/n) rule
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10), abs=1e-12), 1.0)
    for method in ("clopper_pearson", "wilson", "jeffreys"):
        assert proportion_interval(0, 25, method=method)[0] == 0.0
        assert proportion_interval(25, 25, method=method)[1] == 1.0


def bootstrap_warnings(k: int, n: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bootstrap_interval(k, n, n_boot=200)
    return caught


def test_bootstrap_warns_once_within_5_of_0_or_n():
    for k, n in ((0, 2000), (2, 2000), (5, 2000), (1995, 2000), (2000, 2000), (3, 8)):
        caught = bootstrap_warnings(k, n)
        assert len(caught) == 1 and caught[0].category is UserWarning, (k, n)
        assert f"k={k} of n={n}" in str(caught[0].message) and "under-covers" in str(caught[0].message)
    for k, n in ((6, 2000), (1000, 2000), (1994, 2000), (6, 12)):
        assert bootstrap_warnings(k, n) == [], (k, n)
    assert bootstrap_warnings(0, 0) == []  # n = 0 is (nan, nan), no interval to warn about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proportion_interval(1, 500, method="bootstrap")
        proportion_interval(1, 500, method="wilson")
    assert len(caught) == 1


@pytest.mark.filterwarnings("ignore:bootstrap interval for k=")
def test_bootstrap_under_covers_near_one_where_clopper_pearson_does_not():
    cov = exact_coverage(0.999, 2000, "bootstrap")
    assert 0.80 < cov < 0.90, cov  # 0.864 at 95% nominal: the docstrings' figure
    assert exact_coverage(0.999, 2000, "clopper_pearson") >= 0.95


def test_jeffreys_and_edges():
    a, b = 7 + 0.5, 13 + 0.5
    assert jeffreys(7, 20) == pytest.approx((stats.beta.ppf(0.025, a, b), stats.beta.ppf(0.975, a, b)))
    assert jeffreys(0, 20)[0] == 0.0 and jeffreys(20, 20)[1] == 1.0
    assert 0 < jeffreys(0, 20)[1] < clopper_pearson(0, 20)[1]
    for method in METHODS:
        assert all(math.isnan(x) for x in proportion_interval(0, 0, method=method))
        low, high = proportion_interval(13, 40, method=method)
        assert 0.0 <= low < 13 / 40 < high <= 1.0
    assert bootstrap_interval(13, 40, seed=5) == bootstrap_interval(13, 40, seed=5)
    assert proportion_interval(13, 40, method="bootstrap", seed=5) == bootstrap_interval(13, 40, seed=5)


def test_interval_errors_name_the_key():
    with pytest.raises(UsageError, match="^ci_method='agresti' is not known; allowed: clopper_pearson, wilson"):
        proportion_interval(1, 10, method="agresti")
    for bad in (0.0, 1.0, 1.5, -0.1, 95, float("nan"), True, "high"):
        with pytest.raises(UsageError, match=r"^ci_level=.* is not allowed: a number in \(0, 1\)"):
            proportion_interval(1, 10, level=bad)
    for k, n in ((11, 10), (-1, 10), (1, -1)):  # counts come from files biasamp wrote: a bug, not a user's value
        with pytest.raises(ValueError):
            proportion_interval(k, n)
    with pytest.raises(ValueError):
        clopper_pearson(1.5, 10)


# ---------------------------------------------------------------------------------------------- estimates


def tidy(records: dict[tuple, int], attributes: list[str]) -> pd.DataFrame:
    """counts.csv layout from {(class, *values, valid): count}."""
    rows = [{"class": key[0], **dict(zip(attributes, key[1:-1], strict=True)), "valid": key[-1], "count": c}
            for key, c in records.items()]
    return pd.DataFrame.from_records(rows, columns=["class", *attributes, "valid", "count"])


@pytest.fixture
def two_class() -> pd.DataFrame:
    # values named unlike the classes: alignment is by position (class k <-> value k)
    return tidy({("0", "red", True): 40, ("0", "red", False): 5, ("0", "green", True): 8, ("0", "green", False): 2,
                 ("1", "red", True): 3, ("1", "red", False): 0, ("1", "green", True): 37, ("1", "green", False): 5,
                 ("uncond", "red", True): 30, ("uncond", "red", False): 2,
                 ("uncond", "green", True): 15, ("uncond", "green", False): 3}, ["colour"])


def test_rho_model_two_classes(two_class):
    est = rho_model_from_counts(two_class, ["0", "1"], ["red", "green"], "colour")
    assert isinstance(est, RhoEstimate)
    assert (est.n, est.n_aligned, est.rho_model) == (100, 87, 0.87)
    ref = stats.binomtest(87, 100).proportion_ci(0.95, method="exact")
    assert (est.ci_low, est.ci_high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert (est.ci_method, est.ci_level) == ("clopper_pearson", 0.95)
    valid = rho_model_from_counts(two_class, ["0", "1"], ["red", "green"], "colour", level=0.9, valid_only=True)
    assert (valid.n, valid.n_aligned, valid.rho_model, valid.ci_level) == (88, 77, 77 / 88, 0.9)
    wil = rho_model_from_counts(two_class, ["0", "1"], ["red", "green"], "colour", method="wilson")
    assert (wil.ci_low, wil.ci_high) == pytest.approx(wilson(87, 100)) and wil.ci_method == "wilson"
    with pytest.raises(UsageError, match="ci_method"):
        rho_model_from_counts(two_class, ["0", "1"], ["red", "green"], "colour", method="nope")


def test_per_class_and_uncond(two_class):
    per = per_class_rho(two_class, ["0", "1"], ["red", "green"], "colour")
    assert list(per.columns) == ["class", "n", "n_aligned", "rho", "ci_low", "ci_high"]
    assert per["class"].tolist() == ["0", "1"]
    assert per["n"].tolist() == [55, 45] and per["n_aligned"].tolist() == [45, 42]
    assert per["rho"].tolist() == pytest.approx([45 / 55, 42 / 45])
    assert (per.loc[1, "ci_low"], per.loc[1, "ci_high"]) == pytest.approx(clopper_pearson(42, 45))
    per_valid = per_class_rho(two_class, ["0", "1"], ["red", "green"], "colour", valid_only=True, method="jeffreys")
    assert per_valid["n"].tolist() == [48, 40] and per_valid["n_aligned"].tolist() == [40, 37]
    assert (per_valid.loc[0, "ci_low"], per_valid.loc[0, "ci_high"]) == pytest.approx(jeffreys(40, 48))

    marg = uncond_marginal(two_class, ["red", "green"], "colour")
    assert list(marg.columns) == ["value", "count", "fraction", "ci_low", "ci_high"]
    assert marg["value"].tolist() == ["red", "green"] and marg["count"].tolist() == [32, 18]
    assert marg["fraction"].tolist() == pytest.approx([0.64, 0.36])
    assert (marg.loc[1, "ci_low"], marg.loc[1, "ci_high"]) == pytest.approx(clopper_pearson(18, 50))
    assert uncond_marginal(two_class, ["red", "green"], "colour", valid_only=True)["count"].tolist() == [30, 15]
    no_uncond = two_class[two_class["class"] != "uncond"]
    empty = uncond_marginal(no_uncond, ["red", "green"], "colour")
    assert empty.empty and list(empty.columns) == ["value", "count", "fraction", "ci_low", "ci_high"]


def test_three_classes_read_back_from_csv():
    m = [[50, 5, 5], [10, 30, 0], [0, 0, 0]]
    records = {}
    for c in range(3):
        for v, name in enumerate(["a", "b", "c"]):
            records[(str(c), name, True)] = m[c][v]
            records[(str(c), name, False)] = 1 if (c, v) == (0, 1) else 0  # one invalid, conflicting
    table = tidy(records, ["bg"])
    # as written and read back by pandas: no uncond row, so "class" comes back as integers
    back = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    assert back["class"].dtype.kind == "i"
    for t in (table, back):
        est = rho_model_from_counts(t, ["0", "1", "2"], ["a", "b", "c"], "bg")
        assert (est.n, est.n_aligned) == (101, 80)
        valid = rho_model_from_counts(t, ["0", "1", "2"], ["a", "b", "c"], "bg", valid_only=True)
        assert (valid.n, valid.n_aligned) == (100, 80)
        per = per_class_rho(t, ["0", "1", "2"], ["a", "b", "c"], "bg")
        assert per["n"].tolist() == [61, 40, 0] and per["n_aligned"].tolist() == [50, 30, 0]
        assert math.isnan(per.loc[2, "rho"]) and math.isnan(per.loc[2, "ci_low"])
        assert uncond_marginal(t, ["a", "b", "c"], "bg").empty
    # class order follows class_names, not the table
    per = per_class_rho(table, ["2", "1", "0"], ["c", "b", "a"], "bg")
    assert per["class"].tolist() == ["2", "1", "0"] and per["n_aligned"].tolist() == [0, 30, 50]
    # ... and alignment is by position: pairing class "0" with value "c" counts its 5 "c" samples
    per = per_class_rho(table, ["2", "1", "0"], ["a", "b", "c"], "bg")
    assert per["n_aligned"].tolist() == [0, 30, 5]
    with pytest.raises(ValueError, match="class"):
        rho_model_from_counts(table, ["0", "1"], ["a", "b", "c"], "bg")  # class "2" unknown


def test_multi_attribute_sums_the_other_out():
    cells = {("0", "red", "red"): 30, ("0", "red", "green"): 10, ("0", "green", "red"): 5,
             ("0", "green", "green"): 5, ("1", "red", "red"): 2, ("1", "red", "green"): 8,
             ("1", "green", "red"): 4, ("1", "green", "green"): 36, ("uncond", "red", "red"): 7,
             ("uncond", "red", "green"): 1, ("uncond", "green", "red"): 1, ("uncond", "green", "green"): 1}
    records = {}
    for key, c in cells.items():
        records[(*key, True)] = c
        records[(*key, False)] = 0
    table = tidy(records, ["left", "right"])
    values = {"left": ["red", "green"], "right": ["red", "green"]}
    by = {a: rho_model_from_counts(table, ["0", "1"], v, a) for a, v in values.items()}
    assert (by["left"].n, by["left"].n_aligned, by["left"].rho_model) == (100, 80, 0.8)
    assert (by["right"].n, by["right"].n_aligned, by["right"].rho_model) == (100, 79, 0.79)
    assert (by["right"].ci_low, by["right"].ci_high) == pytest.approx(clopper_pearson(79, 100))
    by_w = rho_model_from_counts(table, ["0", "1"], values["left"], "left", level=0.9, method="wilson")
    assert (by_w.ci_low, by_w.ci_high) == pytest.approx(wilson(80, 100, 0.9))
    assert uncond_marginal(table, ["red", "green"], "right")["count"].tolist() == [8, 2]
    assert per_class_rho(table, ["0", "1"], ["red", "green"], "right")["n_aligned"].tolist() == [35, 44]


def test_analysis_does_not_import_torch():
    code = "import sys, biasamp.analysis; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- correction

C3 = np.array([[0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.02, 0.08, 0.90]])


def test_confusion_matrix_and_meta_format():
    counts = np.array([[90, 10], [30, 70]])
    assert confusion_matrix(counts) == pytest.approx(np.array([[0.9, 0.1], [0.3, 0.7]]))
    with pytest.raises(ValueError, match="row"):
        confusion_matrix([[5, 5], [0, 0]])
    with pytest.raises(ValueError):
        confusion_matrix([[1, 2, 3], [4, 5, 6]])
    meta = {"gender": {"labels": ["male", "female"], "counts": [[70, 30], [10, 90]]}}
    reordered = confusion_counts_for(meta, "gender", ["female", "male"])
    assert reordered.tolist() == [[90, 10], [30, 70]]
    assert confusion_counts_for(meta["gender"], None, ["male", "female"]).tolist() == [[70, 30], [10, 90]]
    with pytest.raises(ValueError):
        confusion_counts_for(meta, "gender", ["female", "old"])


def test_correction_recovers_known_truth():
    truth = np.array([0.7, 0.2, 0.1])
    conf_counts = C3 * 10_000
    expected = 1e6 * truth @ C3
    assert correct_distribution(expected, conf_counts) == pytest.approx(truth, abs=1e-9)
    rng = np.random.default_rng(0)
    observed = rng.multinomial(1_000_000, truth @ C3)
    p = correct_distribution(observed, conf_counts)
    assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)
    assert p == pytest.approx(truth, abs=3e-3)
    raw = observed / observed.sum()
    assert np.abs(raw - truth).max() > 0.05  # the raw shares are far off: the correction did the work


def test_identity_confusion_changes_nothing():
    observed = np.array([13, 0, 87, 5])
    p = correct_distribution(observed, np.diag([50, 20, 30, 1]))
    assert p == pytest.approx(observed / observed.sum(), abs=1e-12)


def test_clipping_when_naive_inverse_leaves_simplex():
    counts = np.array([[90, 10], [20, 80]])
    conf = confusion_matrix(counts)
    observed = np.array([5, 95])  # 5% predicted value 0, yet even p0 = 0 gives 20%
    naive = (observed / 100) @ np.linalg.inv(conf)
    assert naive[0] < 0
    assert correct_distribution(observed, counts) == pytest.approx([0.0, 1.0], abs=1e-12)
    # three values: the MLE lies on the face p0 = 0, solved there by hand
    c3 = np.array([[80, 10, 10], [10, 80, 10], [10, 10, 80]])
    observed3 = np.array([5, 50, 45])
    assert ((observed3 / 100) @ np.linalg.inv(confusion_matrix(c3)))[0] < 0
    # on p0 = 0: q1 = 0.1 + 0.7 p1, q2 = 0.8 - 0.7 p1; 50 / q1 = 45 / q2 gives p1 = 35.5 / 66.5
    p = correct_distribution(observed3, c3)
    assert p == pytest.approx([0.0, 35.5 / 66.5, 31 / 66.5], abs=1e-9)
    # not merely clip-and-renormalise of the naive inverse
    clipped = np.clip((observed3 / 100) @ np.linalg.inv(confusion_matrix(c3)), 0, None)
    assert np.abs(clipped / clipped.sum() - p).max() > 1e-4


def test_correction_is_the_constrained_mle():
    rng = np.random.default_rng(7)
    for _ in range(5):
        v = 4
        conf_counts = rng.integers(1, 20, size=(v, v)) + np.diag(rng.integers(40, 80, size=v))
        conf = confusion_matrix(conf_counts)
        truth = rng.dirichlet(np.full(v, 0.3))  # often near a face
        observed = rng.multinomial(300, truth @ conf)
        p = correct_distribution(observed, conf_counts)
        assert p.sum() == pytest.approx(1.0) and np.all(p >= 0)

        def nll(x, conf=conf, observed=observed):
            return -float(observed @ np.log(np.clip(x @ conf, 1e-300, None)))

        ref = optimize.minimize(nll, np.full(v, 1 / v), method="SLSQP", bounds=[(0, 1)] * v,
                                constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
                                options={"ftol": 1e-14, "maxiter": 1000})
        assert nll(p) <= ref.fun + 1e-7
        # KKT: gradient 1 on the support, <= 1 off it
        grad = conf @ (observed / observed.sum() / (p @ conf))
        assert np.all(np.where(p > 1e-9, np.abs(grad - 1) < 1e-6, grad <= 1 + 1e-6))


def test_binary_correction_is_the_hand_inverse():
    """Binary: p0 = (q0 - C[1, 0]) / (C[0, 0] - C[1, 0]) while that is in [0, 1], else clipped to it."""
    counts = np.array([[90, 10], [20, 80]])  # C = [[0.9, 0.1], [0.2, 0.8]]
    assert correct_distribution([30, 70], counts) == pytest.approx([0.1 / 0.7, 0.6 / 0.7], abs=1e-12)
    assert correct_distribution([50, 50], [[95, 5], [5, 95]]) == pytest.approx([0.5, 0.5], abs=1e-12)
    assert correct_distribution([10, 90], counts)[0] == 0.0  # (0.1 - 0.2) / 0.7 < 0
    assert correct_distribution([95, 5], counts)[0] == 1.0  # (0.95 - 0.2) / 0.7 > 1
    assert correct_distribution([30, 70], [[7, 0], [0, 9]]) == pytest.approx([0.3, 0.7], abs=1e-12)


def simulated_table(rng, truths, conf, n):
    records = {}
    for c, truth in enumerate(truths):
        observed = rng.multinomial(n, truth @ conf)
        for v, k in enumerate(observed):
            records[(str(c), f"v{v}", True)] = int(k)
            records[(str(c), f"v{v}", False)] = 0
    return tidy(records, ["attr"])


def test_corrected_rho_recovers_and_widens():
    rng = np.random.default_rng(11)
    conf = np.array([[0.9, 0.1], [0.2, 0.8]])
    truths = np.array([[0.9, 0.1], [0.15, 0.85]])
    rho_true = (0.9 + 0.85) / 2
    table = simulated_table(rng, truths, conf, 2000)
    names, values = ["0", "1"], ["v0", "v1"]
    small = np.array([rng.multinomial(60, row) for row in conf])  # a small labelled held-out set
    res = corrected_rho(table, names, values, "attr", small, n_boot=2000, seed=0)
    raw = rho_model_from_counts(table, names, values, "attr")
    assert res["rho_raw"] == pytest.approx(raw.rho_model)
    assert abs(res["rho_raw"] - rho_true) > 0.05  # raw is biased by the oracle
    assert res["ci_low"] <= rho_true <= res["ci_high"]
    assert res["ci_high"] - res["ci_low"] > 1.5 * (raw.ci_high - raw.ci_low)
    per = res["per_class"]
    assert [r["class"] for r in per] == names and [r["n"] for r in per] == [2000, 2000]
    assert res["rho_corrected"] == pytest.approx(np.mean([r["rho_corrected"] for r in per]))
    assert per[0]["rho_corrected"] == pytest.approx(correct_distribution(
        [table.loc[(table["class"] == "0") & (table["attr"] == v), "count"].sum() for v in values], small)[0])
    for r in per:
        assert r["ci_low"] <= r["rho_corrected"] <= r["ci_high"]
    # more labelled data -> a narrower interval; the same seed -> the same answer
    big = np.array([rng.multinomial(20000, row) for row in conf])
    res_big = corrected_rho(table, names, values, "attr", big, n_boot=2000, seed=0)
    assert res_big["ci_high"] - res_big["ci_low"] < res["ci_high"] - res["ci_low"]
    assert res_big["rho_corrected"] == pytest.approx(rho_true, abs=0.02)
    assert corrected_rho(table, names, values, "attr", small, n_boot=500, seed=4) == corrected_rho(
        table, names, values, "attr", small, n_boot=500, seed=4)


def test_corrected_rho_identity_and_meta_mapping(two_class):
    ident = np.diag([100, 100])
    res = corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", ident, n_boot=1000)
    assert res["rho_corrected"] == pytest.approx(res["rho_raw"]) and res["rho_raw"] == pytest.approx(0.87)
    assert res["n"] == 100 and res["ci_method"] == "dirichlet_posterior" and res["confusion"] == "pooled"
    meta = {"colour": {"labels": ["green", "red"], "counts": [[80, 20], [10, 90]]}}
    via_meta = corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", meta, n_boot=300)
    direct = corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", [[90, 10], [20, 80]], n_boot=300)
    assert via_meta["rho_corrected"] == pytest.approx(direct["rho_corrected"])
    assert (via_meta["ci_low"], via_meta["ci_high"]) == pytest.approx((direct["ci_low"], direct["ci_high"]))
    with pytest.raises(UsageError, match="ci_level"):
        corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", ident, level=2)


def test_corrected_rho_interval_coverage():
    """Over repeated experiments (both the generated samples and the labelled set redrawn) it covers ~95%."""
    rng = np.random.default_rng(2024)
    conf = np.array([[0.85, 0.10, 0.05], [0.10, 0.80, 0.10], [0.05, 0.15, 0.80]])
    truths = np.array([[0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.05, 0.15, 0.8]])
    rho_true = float(np.mean(np.diagonal(truths)))
    names, values = ["0", "1", "2"], ["v0", "v1", "v2"]
    hits = raw_hits = 0
    reps = 100
    for r in range(reps):
        table = simulated_table(rng, truths, conf, 400)
        held_out = np.array([rng.multinomial(80, row) for row in conf])
        res = corrected_rho(table, names, values, "attr", held_out, n_boot=400, seed=r)
        hits += res["ci_low"] <= rho_true <= res["ci_high"]
        raw = rho_model_from_counts(table, names, values, "attr")
        raw_hits += raw.ci_low <= rho_true <= raw.ci_high
    assert hits >= 0.88 * reps, hits
    assert raw_hits <= 0.2 * reps, raw_hits  # ignoring the oracle's error misses the truth


def test_corrected_rho_sample_noise_scaled_by_youden():
    """With a (nearly) exactly known binary confusion only the samples vary: the interval is the raw one / J."""
    rng = np.random.default_rng(5)
    conf = np.array([[0.9, 0.1], [0.2, 0.8]])  # Youden J = 0.9 + 0.8 - 1 = 0.7
    table = simulated_table(rng, np.array([[0.8, 0.2], [0.3, 0.7]]), conf, 2000)
    exact = np.round(conf * 1e8).astype(np.int64)
    res = corrected_rho(table, ["0", "1"], ["v0", "v1"], "attr", exact, n_boot=4000, seed=1)
    raw = rho_model_from_counts(table, ["0", "1"], ["v0", "v1"], "attr")
    assert res["rho_corrected"] == pytest.approx((raw.rho_model * 4000 - 2000 * (0.2 + 0.1)) / 4000 / 0.7, abs=1e-6)
    width, raw_width = res["ci_high"] - res["ci_low"], raw.ci_high - raw.ci_low
    assert width == pytest.approx(raw_width / 0.7, rel=0.1)


def test_corrected_rho_empty_class_and_valid_only():
    records = {}
    for c, row in enumerate([[50, 10], [5, 35], [0, 0]]):
        for v, k in enumerate(row):
            records[(str(c), f"v{v}", True)] = k
            records[(str(c), f"v{v}", False)] = 7 if (c, v) == (1, 0) else 0
    table = tidy(records, ["attr"])
    conf = [[90, 10], [10, 90]]
    res = corrected_rho(table, ["0", "1", "2"], ["v0", "v1"], "attr", conf, n_boot=200)
    assert res["n"] == 107 and res["rho_raw"] == pytest.approx(85 / 107)
    per = res["per_class"]
    assert per[2]["n"] == 0 and math.isnan(per[2]["rho_corrected"]) and math.isnan(per[2]["ci_low"])
    # class "2" has no own value among two: it could only ever count as conflicting
    p0 = correct_distribution([50, 10], conf)
    p1 = correct_distribution([12, 35], conf)
    assert res["rho_corrected"] == pytest.approx((60 * p0[0] + 47 * p1[1]) / 107)
    valid = corrected_rho(table, ["0", "1", "2"], ["v0", "v1"], "attr", conf, n_boot=200, valid_only=True)
    assert valid["n"] == 100 and valid["rho_raw"] == pytest.approx(0.85)


def test_corrected_rho_refuses_rates(two_class):
    with pytest.raises(ValueError, match="whole counts"):
        corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", [[0.9, 0.1], [0.2, 0.8]])


def test_figure_formats_are_checked_as_a_usage_error():
    from biasamp.analysis.plots import check_formats

    assert check_formats(["png", "pdf"]) == ["png", "pdf"] and check_formats("svg") == ["svg"]
    with pytest.raises(UsageError, match=r"^formats=\['png', 'jpg'\]: unknown figure format\(s\) \['jpg'\]"):
        check_formats(["png", "jpg"])


def test_n_boot_is_checked_as_a_usage_error(two_class):
    from biasamp.analysis.intervals import check_n_boot

    assert check_n_boot(2000) == 2000 and check_n_boot(np.int64(5)) == 5 and check_n_boot(300.0) == 300
    for bad in (0, -5, 2.5, True, "many"):
        with pytest.raises(UsageError, match=r"^n_boot=.* is not allowed: an integer >= 1"):
            bootstrap_interval(5, 10, n_boot=bad)
    with pytest.raises(UsageError, match="^n_boot=0"):
        corrected_rho(two_class, ["0", "1"], ["red", "green"], "colour", [[90, 10], [20, 80]], n_boot=0)
