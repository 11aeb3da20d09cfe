"""The paper recipes in their tiny SMOKE=1 mode: train -> count -> report end to end through the Makefile."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

# settings each recipe sweeps in SMOKE mode: (sweep name, settings, figures that must exist)
RECIPES = [
    ("paper-bmnist", 8, ["rho_vs_rho_data.png", "rho_vs_steps.png", "rho_vs_churn.png"]),
    ("paper-steps", 8, ["rho_vs_steps.png"]),
    ("paper-guidance", 3, ["rho_vs_guidance.png"]),
    ("paper-bmnist-2class", 4, ["rho_vs_churn.png"]),
    ("paper-multicolor", 4, ["rho_vs_guidance.png"]),  # 2 settings x 2 attributes
]
CHURN_RECIPES = ("paper-bmnist", "paper-steps", "paper-bmnist-2class")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_churn_recipes_run_end_to_end(tmp_path):
    """paper-bmnist (churn in the seed's window, rho sweep, steps): the default set's recipe check; paper-steps and
    the others run in the slow set."""
    run_recipes(tmp_path, RECIPES[:1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_paper_targets_run_end_to_end(tmp_path):
    """Every paper recipe (4 1/2 minutes on 2 cores: the rest of them run in the slow set)."""
    run_recipes(tmp_path, RECIPES)


def run_recipes(tmp_path: Path, recipes: list) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for target, settings, figures in recipes:  # in order: paper-steps and -guidance reuse paper-bmnist's models
        proc = subprocess.run(["make", "-s", target, "SMOKE=1", f"PY={sys.executable}", f"OUT={tmp_path}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (target, proc.stderr[-3000:])
        sweep = tmp_path / "smoke" / "count" / target
        results = pd.read_csv(sweep / "results.csv")
        assert len(results) == settings, target
        assert results["rho_model"].between(0, 1).all() and (results["ci_low"] <= results["ci_high"]).all()
        assert (results["precision"] == "fp32").all(), target  # the seed's precision, resolved, in every recipe
        if target in CHURN_RECIPES:  # churn in the seed's window, not at every step
            churn = results[results["sampler.s_churn"] > 0]
            assert len(churn) and (churn["sampler.s_min"] == 0.05).all() and (churn["sampler.s_max"] == 50).all()
            assert (churn["sampler.s_noise"] == 1.003).all(), target
        for fig in figures:
            assert (sweep / "report" / fig).stat().st_size > 0, (target, fig)
        assert (sweep / "report" / "results.md").is_file()
        assert len(list((sweep / "report" / "heatmaps").glob("*.png"))) >= 1  # SMOKE draws one job's heatmap
        if target == "paper-multicolor":
            check_multicolor(sweep, results)
        if target == "paper-steps":  # the rho 0.9 model of paper-bmnist is reused, not trained again
            assert re.search(r"paper_bmnist_rho0.9_seed0-[0-9a-f]{8} is already finished", proc.stdout)


def check_multicolor(sweep: Path, results: pd.DataFrame) -> None:
    """Two bias attributes through counts, results.csv, meta.json and the report (SMOKE: rho_left 0.9,
    rho_right 0.8, 10 classes, 2 samples per class, w in {0, 1})."""
    from biasamp.data import COLOUR_NAMES

    assert sorted(results["attribute"]) == ["left", "left", "right", "right"]
    assert dict(zip(results["attribute"], results["rho_data"], strict=True)) == {"left": 0.9, "right": 0.8}
    for _, row in results.iterrows():
        counts = pd.read_csv(sweep / row["job_dir"] / "counts.csv")
        assert list(counts.columns) == ["class", "left", "right", "valid", "count"]
        assert counts.groupby("class")["count"].sum().tolist() == [2] * 10
        own = counts["class"].map(lambda c: COLOUR_NAMES[int(c)])
        assert row["n"] == 20 and row["n_aligned"] == counts.loc[counts[row["attribute"]] == own, "count"].sum()
    meta = json.loads((sweep / results["job_dir"].iloc[0] / "meta.json").read_text())
    assert meta["rho_data_by_attribute"] == {"left": 0.9, "right": 0.8}
    assert sorted(pd.read_csv(sweep / "report" / "results.csv")["attribute"]) == ["left", "left", "right", "right"]
    per_class = pd.read_csv(sweep / "report" / "per_class.csv")
    assert (per_class.loc[per_class["attribute"] == "right", "class_rho_data"] == 0.8).all()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_mitigation_balancing_runs_end_to_end(tmp_path):
    """make mitigation-balancing SMOKE=1: model -> heads (noised, inversion, trajectory) -> unsteered and steered
    counts -> report with the steering table and the dose-response figure."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "-s", "mitigation-balancing", "SMOKE=1", f"PY={sys.executable}", f"OUT={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    smoke = tmp_path / "smoke"
    for source in ("noised", "inversion", "trajectory-w1"):
        assert (smoke / "hspace" / f"balancing_smoke-edm4-{source}" / "heads.pt").is_file()
    assert (smoke / "hspace" / "balancing_smoke-edm4-accuracy.png").stat().st_size > 0
    sweep = smoke / "count" / "mitigation-balancing"
    results = pd.read_csv(sweep / "results.csv", keep_default_na=False, na_values=[""])
    # 2 unsteered (w 0, 1) + noised heads 2 targets x 2 w (scale 1000) + inversion heads (w 0) + trajectory heads
    # (data target, w 1)
    assert len(results) == 2 + 4 + 1 + 1
    steered = results[results["steer"].notna()]
    assert sorted(set(steered["steer_target"])) == ["data", "uniform"]
    assert set(h.split(":")[0] for h in steered["steer_heads"]) == {"noised", "inversion", "trajectory"}
    assert results["steer"].isna().sum() == 2
    steering = pd.read_csv(sweep / "report" / "steering.csv")
    assert len(steering) == 2 * len(results)  # one row per class of every job
    assert (steering["fd_low"] <= steering["fd"]).all() and (steering["fd"] <= steering["fd_high"]).all()
    assert (sweep / "report" / "rho_vs_steer_scale.png").stat().st_size > 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_mitigation_invdiff_runs_end_to_end(tmp_path):
    """make mitigation-invdiff SMOKE=1: base -> grouper and true-label groups -> two InvDiff fine-tunes -> counts
    of the base and both mixed models at w 0 and 1 -> report with the mitigation column and the Bias table."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["make", "-s", "mitigation-invdiff", "SMOKE=1", f"PY={sys.executable}", f"OUT={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    smoke = tmp_path / "smoke"
    for groups in ("grouper", "true_labels"):
        diagnostics = json.loads((smoke / "invdiff" / f"invdiff_base_smoke-{groups}" / "diagnostics.json").read_text())
        assert 0.0 <= diagnostics["auc"] <= 1.0
    sweep = smoke / "count" / "mitigation-invdiff"
    results = pd.read_csv(sweep / "results.csv", keep_default_na=False, na_values=[""])
    assert len(results) == 3 * 2  # base, InvDiff (grouper), InvDiff (true labels) x w 0, 1
    assert sorted(results["mitigation"].fillna("none").unique()) == [
        "invdiff-grouper convex r=0.8 lam=1", "invdiff-true_labels convex r=0.8 lam=1", "none"]
    bias = pd.read_csv(sweep / "report" / "bias.csv")
    assert len(bias) == 3 * len(results)  # 2 classes + the mean per job
    assert (bias["bias_low"] <= bias["bias"]).all() and (bias["bias"] <= bias["bias_high"]).all()
