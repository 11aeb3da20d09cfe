"""Reporting steering: FD to a target and its interval (hand values, coverage by simulation), the per-class
targets a job's meta.json implies, and the dose-response frame."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta

from biasamp.analysis.steering import class_targets, dose_response_frame, fd_interval


def _cp(k, n, level):
    a = 1 - level  # Clopper–Pearson from the beta quantiles, written out
    lo = 0.0 if k == 0 else beta.ppf(a / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta.ppf(1 - a / 2, k + 1, n - k)
    return lo, hi


def test_fd_of_two_values_is_sqrt2_times_the_distance_and_its_interval_the_image_of_clopper_pearson():
    fd, low, high = fd_interval([30, 10], [0.5, 0.5])
    lo, hi = _cp(30, 40, 0.95)
    assert fd == pytest.approx(math.sqrt(2) * 0.25)
    assert low == pytest.approx(math.sqrt(2) * (lo - 0.5)) and high == pytest.approx(math.sqrt(2) * (hi - 0.5))
    fd, low, high = fd_interval([20, 20], [0.9, 0.1])
    lo, hi = _cp(20, 40, 0.95)
    assert fd == pytest.approx(math.sqrt(2) * 0.4)
    assert low == pytest.approx(math.sqrt(2) * (0.9 - hi)) and high == pytest.approx(math.sqrt(2) * (0.9 - lo))
    assert fd_interval([5, 5], [0.5, 0.5])[1] == 0.0  # the target inside the interval: FD may be 0


def test_fd_of_three_values_uses_a_bonferroni_box():
    counts, target = [50, 30, 20], [1 / 3, 1 / 3, 1 / 3]
    fd, low, high = fd_interval(counts, target)
    share = np.array(counts) / 100
    assert fd == pytest.approx(float(np.sqrt(((share - 1 / 3) ** 2).sum())))
    boxes = [_cp(c, 100, 1 - 0.05 / 3) for c in counts]
    near = [0.0 if lo <= 1 / 3 <= hi else min(abs(lo - 1 / 3), abs(hi - 1 / 3)) for lo, hi in boxes]
    far = [max(abs(lo - 1 / 3), abs(hi - 1 / 3)) for lo, hi in boxes]
    assert low == pytest.approx(math.sqrt(sum(x * x for x in near)))
    assert high == pytest.approx(math.sqrt(sum(x * x for x in far)))


@pytest.mark.parametrize("n", [50, 200])
@pytest.mark.parametrize("rho", [0.5, 0.7, 0.9, 0.98])
@pytest.mark.parametrize("t", [0.5, 0.9])
def test_fd_interval_of_two_values_covers_exactly_computed(n, rho, t):
    """Coverage summed over every outcome k ~ Binomial(n, rho): no simulation noise."""
    from scipy.stats import binom

    true_fd = math.sqrt(2) * abs(rho - t)
    covered = [fd_interval([k, n - k], [t, 1 - t])[1:] for k in range(n + 1)]
    coverage = sum(binom.pmf(k, n, rho) for k, (low, high) in enumerate(covered)
                   if low - 1e-12 <= true_fd <= high + 1e-12)
    assert coverage >= 0.95 - 1e-9, coverage


def test_fd_interval_of_three_values_covers_by_simulation():
    rng = np.random.default_rng(11)
    cache: dict = {}
    for p in (np.array([1, 1, 1]) / 3, np.array([0.6, 0.3, 0.1]), np.array([0.9, 0.05, 0.05])):
        for t in (np.full(3, 1 / 3), np.array([0.6, 0.3, 0.1])):
            true_fd = float(np.sqrt(((p - t) ** 2).sum()))
            hits, reps = 0, 100
            for _ in range(reps):
                counts = tuple(int(c) for c in rng.multinomial(100, p))
                key = (counts, tuple(t))
                if key not in cache:
                    cache[key] = fd_interval(counts, t)
                _, low, high = cache[key]
                hits += low - 1e-12 <= true_fd <= high + 1e-12
            assert hits / reps >= 0.94, (p, t, hits / reps)


def test_class_targets_of_unsteered_distribution_and_sample_jobs():
    plain = SimpleNamespace(class_names=["0", "1"], steering=None)
    assert class_targets(plain, ["red", "green"]) == ("uniform", [[0.5, 0.5], [0.5, 0.5]])
    dist = SimpleNamespace(class_names=["0", "1"], steering={"mode": "distribution", "target": "data",
                                                           "targets": [[0.9, 0.1], [0.1, 0.9]]})
    assert class_targets(dist, ["red", "green"]) == ("data", [[0.9, 0.1], [0.1, 0.9]])
    one = SimpleNamespace(class_names=["0", "1"], steering={"mode": "sample", "target": "green", "target_value": 1})
    assert class_targets(one, ["red", "green"]) == ("green", [[0.0, 1.0], [0.0, 1.0]])


def test_dose_response_puts_the_unsteered_job_at_scale_zero_of_every_target_line():
    df = pd.DataFrame({"job_dir": ["plain", "u", "d"], "guidance": [0.0, 0.0, 0.0],
                       "steer": [np.nan, "distribution", "distribution"], "steer_target": [np.nan, "uniform", "data"],
                       "steer_scale": [np.nan, 100.0, 100.0], "rho_model": [0.9, 0.6, 0.9]})
    frame = dose_response_frame(df)
    assert len(frame) == 4
    zero = frame[frame["steer_scale"] == 0]
    assert sorted(zero["steer_target"]) == ["data", "uniform"] and set(zero["job_dir"]) == {"plain"}
    assert dose_response_frame(df[df["job_dir"] == "plain"]).empty
