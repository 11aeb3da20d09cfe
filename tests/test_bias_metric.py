"""InvDiff's Bias metric: hand values, the two-value identity |2 rho - 1|, the box minimum against a brute-force
search, and the coverage of its interval (exact for two values, simulated for three)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom

from biasamp.analysis.bias_metric import bias_interval, bias_metric


def test_hand_values_of_the_released_formula():
    assert bias_metric([3, 1]) == pytest.approx(0.5)  # |3 - 1| / 4 / 1
    assert bias_metric([2, 2]) == 0.0
    assert bias_metric([6, 3, 1]) == pytest.approx((3 + 5 + 2) / 10 / 3)  # pairs (6,3), (6,1), (3,1)
    assert bias_metric([5, 0, 0, 0]) == pytest.approx(0.5)  # one value only: 2 / V
    for k in (0, 7, 31, 50):
        assert bias_metric([k, 50 - k]) == pytest.approx(abs(2 * k / 50 - 1))


def test_two_value_interval_is_the_image_of_clopper_pearson():
    from biasamp.analysis.intervals import clopper_pearson

    value, lo, hi = bias_interval([180, 20])
    r_lo, r_hi = clopper_pearson(180, 200)
    assert value == pytest.approx(0.8)
    assert (lo, hi) == pytest.approx((2 * r_lo - 1, 2 * r_hi - 1))
    value, lo, hi = bias_interval([52, 48])  # 1/2 inside the interval of r: Bias can be 0
    assert lo == 0.0 and hi == pytest.approx(max(abs(2 * x - 1) for x in clopper_pearson(52, 100)))


def test_box_minimum_and_maximum_match_a_brute_force_search():
    from biasamp.analysis.bias_metric import _pairwise

    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 11)
    for _ in range(30):
        lows = rng.uniform(0, 0.6, 3)
        highs = lows + rng.uniform(0.05, 0.4, 3)
        axes = [lows[k] + grid * (highs[k] - lows[k]) for k in range(3)]
        values = [_pairwise(np.array(p)) for p in itertools.product(*axes)]
        levels = np.concatenate([lows, highs])
        low = min(_pairwise(np.clip(m, lows, highs)) for m in levels)
        high = max(_pairwise(np.array(p)) for p in itertools.product(*zip(lows, highs, strict=True)))
        assert low <= min(values) + 1e-12 and high >= max(values) - 1e-12
        assert low >= min(values) - 0.05 * (highs - lows).max()  # the grid's resolution


@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.98])
@pytest.mark.parametrize("n", [50, 200])
def test_two_value_interval_covers_at_least_its_level_exactly(p, n):
    truth = abs(2 * p - 1)
    bounds = [bias_interval([k, n - k])[1:] for k in range(n + 1)]
    covered = sum(binom.pmf(k, n, p) for k, (lo, hi) in enumerate(bounds) if lo - 1e-12 <= truth <= hi + 1e-12)
    assert covered >= 0.95


@pytest.mark.parametrize("p", [(1 / 3, 1 / 3, 1 / 3), (0.8, 0.15, 0.05)])
def test_three_value_interval_covers_in_simulation(p):
    rng = np.random.default_rng(1)
    truth = bias_metric(np.array(p) * 1e6)
    draws = rng.multinomial(150, p, size=200)
    hits = [lo - 1e-12 <= truth <= hi + 1e-12 for _, lo, hi in (bias_interval(d) for d in draws)]
    assert np.mean(hits) >= 0.94
