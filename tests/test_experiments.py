"""The paper recipes in their tiny SMOKE=1 mode: train -> count -> report end to end through the Makefile."""

from __future__ import annotations

import os
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


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_smoke_paper_targets_run_end_to_end(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for target, settings, figures in RECIPES:  # in order: paper-steps and -guidance reuse paper-bmnist's models
        proc = subprocess.run(["make", "-s", target, "SMOKE=1", f"PY={sys.executable}", f"OUT={tmp_path}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (target, proc.stderr[-3000:])
        sweep = tmp_path / "smoke" / "count" / target
        results = pd.read_csv(sweep / "results.csv")
        assert len(results) == settings, target
        assert results["rho_model"].between(0, 1).all() and (results["ci_low"] <= results["ci_high"]).all()
        for fig in figures:
            assert (sweep / "report" / fig).stat().st_size > 0, (target, fig)
        assert (sweep / "report" / "results.md").is_file()
        if target == "paper-multicolor":
            assert sorted(results["attribute"]) == ["left", "left", "right", "right"]
        if target == "paper-steps":  # the rho 0.9 model of paper-bmnist is reused, not trained again
            assert "paper_bmnist_rho0.9_seed0 is already finished" in proc.stdout
