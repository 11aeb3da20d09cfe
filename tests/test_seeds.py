"""Between-model uncertainty: the seed-aggregate interval against hand computation and by simulation, which
results rows are replicates, and the report's seeds table and figures for three training seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from biasamp.analysis import seeds, tables
from biasamp.checkpoints import seed_free_identity
from biasamp.identity import identity_hash
from tests.test_report import compose_report, write_sweep


# ---------------------------------------------------------------------------------------------- the interval
def test_seed_interval_is_the_t_interval_over_seeds_when_the_seeds_disagree():
    mean, sd, low, high = seeds.seed_interval([90, 95, 80], [100, 100, 100])
    assert mean == pytest.approx(265 / 300) and sd == pytest.approx(math.sqrt(((0.9 - mean) ** 2 + (0.95 - mean) ** 2
                                                                              + (0.8 - mean) ** 2) / 2))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t quantile, 2 degrees of freedom, 97.5%
    assert low == pytest.approx(mean - half) and high == pytest.approx(min(1.0, mean + half))


def test_agreeing_seeds_keep_the_width_of_the_pooled_counts():
    # three models all at 100/100: the t-interval is a point; the pooled Clopper-Pearson interval is not
    mean, sd, low, high = seeds.seed_interval([100, 100, 100], [100, 100, 100])
    assert (mean, sd, high) == (1.0, 0.0, 1.0)
    assert low == pytest.approx(0.025 ** (1 / 300))  # CP lower bound at k = n: (alpha/2)^(1/n)


def test_seed_interval_refuses_a_single_model():
    with pytest.raises(ValueError, match="at least two"):
        seeds.seed_interval([5], [10])


def _coverage(mu: float, tau: float, n: int, s: int, reps: int, rng: np.random.Generator) -> float:
    if tau > 0:  # between-model spread: Beta with mean mu and sd tau
        c = mu * (1 - mu) / tau**2 - 1
        p = rng.beta(mu * c, (1 - mu) * c, size=(reps, s))
    else:
        p = np.full((reps, s), mu)
    k = rng.binomial(n, p)
    _, _, low, high = seeds.seed_intervals(k, n)
    return float(np.mean((low <= mu) & (mu <= high)))


def test_batch_and_single_intervals_agree():
    k = np.array([[90, 95, 80], [100, 100, 100], [0, 1, 0]])
    batch = seeds.seed_intervals(k, 100)
    for i, row in enumerate(k):
        assert seeds.seed_interval(row, [100] * 3) == pytest.approx(tuple(b[i] for b in batch), abs=1e-14)


@pytest.mark.parametrize(("mu", "tau"), [(0.5, 0.0), (0.5, 0.03), (0.9, 0.0), (0.9, 0.03), (0.97, 0.01),
                                         (0.995, 0.0)])
def test_seed_interval_covers_the_population_mean_in_simulation(mu, tau):
    # 3 seeds, 200 samples per model (the quick start's size): coverage of the mean over models >= 0.93
    rng = np.random.default_rng(int(1000 * mu + 10000 * tau))
    assert _coverage(mu, tau, n=200, s=3, reps=4000, rng=rng) >= 0.93


@pytest.mark.parametrize("s", [2, 3, 5])
@pytest.mark.parametrize("n", [100, 2000])
def test_seed_interval_coverage_grid(s, n):
    rng = np.random.default_rng(s * 7 + n)
    for mu, tau in [(0.5, 0.0), (0.5, 0.03), (0.9, 0.0), (0.9, 0.01), (0.9, 0.03), (0.97, 0.01), (0.995, 0.0),
                    (0.999, 0.0)]:
        assert _coverage(mu, tau, n=n, s=s, reps=2000, rng=rng) >= 0.93, (mu, tau)


def test_plain_t_interval_alone_would_fail_at_the_boundary():
    # the reason for the hull: without the pooled counts, agreeing seeds near rho = 1 give a point interval
    rng = np.random.default_rng(3)
    k = rng.binomial(200, 0.995, size=(2000, 2))
    r = k / 200
    half = stats.t.ppf(0.975, 1) * r.std(axis=1, ddof=1) / math.sqrt(2)
    plain = np.mean((r.mean(axis=1) - half <= 0.995) & (0.995 <= r.mean(axis=1) + half))
    _, _, low, high = seeds.seed_intervals(k, 200)
    hull = np.mean((low <= 0.995) & (0.995 <= high))
    assert plain < 0.9 and hull >= 0.95


# ---------------------------------------------------------------------------------------------- replicates
def test_runs_that_differ_only_by_seed_share_their_training_config():
    def meta(seed, lr=1e-3):
        return {"config": {"seed": seed}, "identity": {"seed": seed, "dataset.seed": seed, "optimizer.lr": lr,
                                                       "dataset.rho": 0.9}}
    a, b, c = seed_free_identity(meta(0)), seed_free_identity(meta(1)), seed_free_identity(meta(1, lr=1e-4))
    assert a == b == {"optimizer.lr": 1e-3, "dataset.rho": 0.9}
    assert identity_hash(a) == identity_hash(b) != identity_hash(c)
    # a dataset seed held fixed while the training seed varies: still replicates
    fixed = {"config": {"seed": 2},
             "identity": {"seed": 2, "dataset.seed": 0, "optimizer.lr": 1e-3, "dataset.rho": 0.9}}
    assert seed_free_identity(fixed) == a


@pytest.fixture
def three_seeds(tmp_path):
    root = tmp_path / "runs" / "count"
    # seed 1 and 2 move 2 / 4 aligned samples of each class; seed 0 of rho 0.99 has no replicate
    sweeps = [write_sweep(root, 0.9, train_seed=s, shift=(2 * s, s)) for s in (0, 1, 2)]
    return [*sweeps, write_sweep(root, 0.99)]


def test_seeds_table_aggregates_replicates_only(three_seeds):
    df = tables.load_results(three_seeds)
    agg = tables.seeds_table(df)
    assert len(agg) == 6  # the 6 settings of rho 0.9; rho 0.99 has one model
    assert set(agg["n_seeds"]) == {3} and set(agg["train_seeds"]) == {"0,1,2"}
    row = agg[(agg["sampler.num_steps"] == 6) & (agg["guidance"] == 3)].iloc[0]
    k = [30 + 28, 30 + 28 - 3, 30 + 28 - 6]  # HAND (0.9, 6, 3): 30 + 28 aligned, minus the shifts
    mean, sd, low, high = seeds.seed_interval(k, [100] * 3)
    assert row["rho_model"] == pytest.approx(mean) and row["between_sd"] == pytest.approx(sd)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert row["per_seed"] == "0.580, 0.550, 0.520" and row["n"] == 300
    assert row["delta"] == pytest.approx(mean - 0.9) and row["delta_low"] == pytest.approx(low - 0.9)
    # the results table keeps each model's own row, told apart by its training seed
    results = tables.results_table(df)
    assert len(results) == 24 and "train_seed" in results.columns and "run" not in results.columns


def test_a_model_counted_in_two_sweeps_is_one_replicate(three_seeds, tmp_path):
    again = write_sweep(tmp_path / "again", 0.9, train_seed=1, shift=(2, 1))
    df = tables.load_results([*three_seeds, again])
    assert set(tables.seeds_table(df)["n_seeds"]) == {3}


def test_other_training_configs_are_not_replicates(three_seeds):
    df = tables.load_results(three_seeds)
    df.loc[df["train_seed"] == 2, "train_config"] = "another"  # e.g. another loss weighting
    agg = tables.seeds_table(df)
    assert set(agg["n_seeds"]) == {2} and set(agg["train_seeds"]) == {"0,1"}


def test_report_writes_seed_tables_and_aggregate_lines(three_seeds, tmp_path):
    from biasamp.report import run

    out = tmp_path / "report"
    cfg = compose_report([f"sweep=[{','.join(str(s) for s in three_seeds[:3])}]", f"out_dir={out}",
                          "formats=[png]", "max_heatmaps=0"])
    written = run(cfg)
    md = (out / "seeds.md").read_text()
    assert "training seed" in md and "between-seed SD" in md and "ρ_model per seed" in md
    assert "| 6 | 3 | 0.900 | 0.550 [" in md and "0.580, 0.550, 0.520 | 3 | 0,1,2 | 300 |" in md
    assert out / "seeds.tex" in written["tables"]
    # the figures draw one line per setting (the mean over seeds), not one per model
    frame = seeds.plot_frame(tables.load_results(three_seeds[:3]))
    assert len(frame) == 6 and frame.attrs["seed_aggregate"]
    assert (out / "rho_vs_guidance.png").is_file()


def test_lines_follow_settings_when_seeds_were_counted_under_different_sweeps(three_seeds, tmp_path):
    # seed 0 also under a second sampler setting that seeds 1 and 2 never saw: its single row stays a line of its
    # own setting, and no line is drawn per training seed
    df = tables.load_results(three_seeds[:3])
    extra = df[(df["train_seed"] == 0) & (df["guidance"] == 0)].assign(**{"sampler.solver": "euler"})
    extra["job_dir"] = extra["job_dir"] + "-euler"
    frame = seeds.plot_frame(pd.concat([df, extra], ignore_index=True))
    assert len(frame) == 6 + 2 and "train_seed" not in frame.columns and "run" not in frame.columns
    keys = tables.swept_keys(frame, first=("guidance",))
    assert "sampler.solver" in keys and "train_seed" not in keys


def test_a_model_counted_twice_is_not_drawn_beside_its_aggregate(three_seeds, tmp_path):
    again = write_sweep(tmp_path / "again", 0.9, train_seed=1, shift=(2, 1))
    frame = seeds.plot_frame(tables.load_results([*three_seeds[:3], again]))
    assert len(frame) == 6 and set(frame["n_seeds"]) == {3}


def test_hash_like_training_configs_stay_text(tmp_path):
    # 123e4567 would read as a float (inf) and 01234567 as an integer: two configs would merge, one would split
    root = tmp_path / "runs"
    sweeps = [write_sweep(root, 0.9, train_seed=s) for s in (0, 1)]
    for sweep, config in zip(sweeps, ("123e4567", "456e7890"), strict=True):
        csv = sweep / "results.csv"
        csv.write_text(csv.read_text().replace("cfg0.9", config))
    df = tables.load_results(sweeps)
    assert sorted(set(df["train_config"])) == ["123e4567", "456e7890"] and seeds.seed_table(df).empty


def test_uncond_rows_reach_the_report(tmp_path):
    from biasamp.report import run

    sweep = write_sweep(tmp_path / "runs", 0.9, uncond=(30, 70))
    out = tmp_path / "report"
    run(compose_report([f"sweep={sweep}", f"out_dir={out}", "formats=[png]", "max_heatmaps=0"]))
    table = pd.read_csv(out / "uncond.csv")
    red = table[(table["value"] == "red") & (table["sampler.num_steps"] == 6) & (table["guidance"] == 0)].iloc[0]
    ci = stats.binomtest(30, 100).proportion_ci(0.95, method="exact")
    assert (red["count"], red["rho"]) == (30, 0.3)
    assert (red["ci_low"], red["ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert "unconditional samples" in (out / "uncond.md").read_text()
