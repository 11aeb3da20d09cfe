"""Shared test helpers: the real Hydra configs, composed; the train app run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# fast tests share 2 cores with their subprocesses: keep torch to one thread each
torch.set_num_threads(1)


# the longest test (minutes: every paper recipe end to end) runs first, so that under pytest-xdist the other
# workers fill in around it instead of it starting last and running alone
RUN_FIRST = ("tests/test_experiments.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(RUN_FIRST))  # stable: the order is otherwise kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_train(overrides: list[str], run_dir: Path | str = "/tmp/biasamp-test-run"):
    """The real conf/train.yaml with overrides, as the app would see it (paths.run_dir made concrete)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.run_dir={run_dir}"])


def run_app(app: str, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m biasamp.<app> <args>`` in ``cwd``, outputs under ``cwd/runs``."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "BIASAMP_OUTPUT_DIR": str(cwd / "runs")}
    return subprocess.run([sys.executable, "-m", f"biasamp.{app}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_app("train", [*args, "trainer.enable_progress_bar=false"], cwd, timeout)


def run_count(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_app("count", args, cwd, timeout)


def run_folder(runs: Path, readable: str) -> Path:
    """The one training run folder ``<readable>-<identity hash>`` under ``<runs>/train``."""
    found = sorted((Path(runs) / "train").glob(f"{readable}-*"))
    assert len(found) == 1, f"expected one run folder {readable}-<hash> under {runs}/train, found {found}"
    return found[0]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-class (digits 0 and 1) tiny model trained for a few steps on the embedded Biased MNIST."""
    cwd = tmp_path_factory.mktemp("tiny_ckpt")
    proc = run_train(["experiment=quickstart", "batch_size=32",
                      "trainer.max_steps=20", "name=tiny2"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = sorted((run_folder(cwd / "runs", "tiny2") / "checkpoints").glob("ckpt-*.ckpt"))
    return ckpt


def run_hspace(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_app("hspace", args, cwd, timeout)


@pytest.fixture(scope="session")
def tiny_heads(tiny_checkpoint, tmp_path_factory) -> Path:
    """h-space heads of ``tiny_checkpoint`` for the 4-step EDM (Heun) sampler, from noised images."""
    cwd = tmp_path_factory.mktemp("tiny_heads")
    proc = run_hspace([f"checkpoint={tiny_checkpoint}", "sampler.num_steps=4", "h_source=noised", "steps=100",
                       "name=tiny"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "hspace" / "tiny" / "heads.pt"
