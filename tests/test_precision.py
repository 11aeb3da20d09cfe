"""The bf16-vs-fp32 agreement check (benchmarks/precision_check.py): one count multirun over both precisions,
paired by setting; on a GPU, bf16 counting must agree with fp32 at the largest guidance scale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "precision_check.py"


def run_check(checkpoint: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "precision.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--work-dir",
                           str(tmp_path / "work"), "--out", str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.is_file() else {}


@pytest.mark.slow  # bf16 is slow on a CPU; bf16-vs-fp32 counts are also compared in the default set (test_speed)
def test_check_pairs_fp32_and_bf16_jobs_of_each_setting(tiny_checkpoint, tmp_path):
    proc, report = run_check(tiny_checkpoint, tmp_path, "--accelerator", "cpu", "--guidance", "0,1", "--steps", "3",
                             "--n-per-class", "6")
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert [p["guidance"] for p in report["pairs"]] == [0.0, 1.0] and all(p["n"] == 12 for p in report["pairs"])
    for p in report["pairs"]:
        fp32, bf16 = p["fp32"], p["bf16"]
        assert p["difference"] == pytest.approx(bf16[0] - fp32[0])
        assert p["agree"] == (bf16[1] <= fp32[0] <= bf16[2] and fp32[1] <= bf16[0] <= fp32[2])
    assert report["all_agree"] == (proc.returncode == 0) and report["torch"] and report["date"]
    assert "guidance=0.0, name=edm, solver=heun, num_steps=3" in proc.stdout


@pytest.mark.gpu
def test_bf16_counts_agree_with_fp32_on_cuda(tiny_checkpoint, tmp_path):
    # the largest guidance scale of the quick start, where bf16's error is amplified most (up to 1 + 2w)
    proc, report = run_check(tiny_checkpoint, tmp_path, "--accelerator", "gpu", "--guidance", "0,3", "--steps",
                             "6,18", "--n-per-class", "500")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["all_agree"] and len(report["pairs"]) == 4
