"""A training run's identity, folder, lock, stop and resume: what a cluster that kills and requeues jobs needs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from biasamp.checkpoints import load_checkpoint, metadata
from biasamp.identity import folder_lock
from biasamp.training.runs import plain_settings, readable_name, run_folder_name, train_identity
from tests.conftest import compose_train, run_folder, run_train

QUICK = ["experiment=quickstart", "batch_size=16", "log_every_n_steps=2", "ema_loss_every_n_steps=0"]


def _folder(overrides: list[str]) -> str:
    return run_folder_name(plain_settings(compose_train(overrides)))


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- identity
def test_every_weight_changing_setting_changes_the_folder_and_allow_listed_ones_do_not():
    base = _folder(QUICK)
    assert base.startswith("quickstart_rho0.9_seed0-") and len(base.rsplit("-", 1)[1]) == 8
    changing = ["optimizer.lr=1e-4", "loss.weighting=debias", "loss.P_std=1.0", "ema.halflife_kimg=4",
                "batch_size=32", "total_kimg=20", "trainer.max_steps=5", "trainer.precision=bf16-mixed",
                "model.net.dropout=0.1", "dataset.class_size=100", "seed=1", "lr_schedule._target_="
                "biasamp.training.schedules.CosineToZero"]
    names = {o: _folder([*QUICK, o]) for o in changing}
    assert base not in names.values() and len(set(names.values())) == len(changing)
    for same in ["trainer.devices=2", "log_every_n_steps=4", "callbacks.checkpoint.ckpt_every_kimg=1",
                 "speed.compile=false", "logger=none", "threads=1", "batch_gpu=8", "paths.output_dir=/elsewhere",
                 "trainer.max_time=00:01:00:00", "trainer.enable_progress_bar=false"]:
        assert _folder([*QUICK, same]) == base, same


def test_readable_part_shows_the_datasets_own_rho_and_name_replaces_it():
    cfg = plain_settings(compose_train(["dataset=waterbirds", "model=ddpmpp_64", "dataset.rho=null"]))
    assert readable_name(cfg) == "waterbirds_ddpmpp_64_rhoasis_seed0"
    cfg = plain_settings(compose_train(["dataset=multicolor_mnist", "rho=0.99", "dataset.rho_right=0.8"]))
    assert readable_name(cfg) == "multicolor_mnist_ddpmpp_bmnist_rho0.99_0.8_seed0"
    assert _folder([*QUICK, "name=mine"]).startswith("mine-")
    # the name is not part of the identity: only the readable part changes
    assert _folder([*QUICK, "name=mine"]).rsplit("-", 1)[1] == _folder(QUICK).rsplit("-", 1)[1]
    assert train_identity(cfg)["dataset.rho_right"] == 0.8 and "rho" not in train_identity(cfg)


def test_multirun_over_loss_weighting_gives_two_finished_runs(tmp_path):
    args = ["-m", *QUICK, "loss.weighting=edm,debias", "trainer.max_steps=3", "resume=auto"]
    first = run_train(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "runs" / "train").iterdir() if p.is_dir() and not p.is_symlink())
    assert len(runs) == 2
    ckpts = [load_checkpoint(next((r / "checkpoints").glob("ckpt-*.ckpt"))) for r in runs]
    assert {c["hyper_parameters"]["config"]["loss"]["weighting"] for c in ckpts} == {"edm", "debias"}
    a, b = (c["state_dict"] for c in ckpts)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two models, not one
    assert all(metadata(c)["finished"] for c in ckpts)
    second = run_train(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("already finished") == 2
    # runs/train/<readable> links to the run of that name started (or found finished) last: debias, the sweep's last
    link = tmp_path / "runs" / "train" / "quickstart_rho0.9_seed0"
    assert link.is_symlink()
    assert load_checkpoint(next((link / "checkpoints").glob("*.ckpt")))["hyper_parameters"]["config"]["loss"][
        "weighting"] == "debias"


def test_allow_listed_changes_resume_the_same_run(tmp_path):
    args = [*QUICK, "trainer.max_steps=4", "callbacks.checkpoint.ckpt_every_kimg=0.032"]
    assert run_train(args, cwd=tmp_path).returncode == 0
    run = run_folder(tmp_path / "runs", "quickstart_rho0.9_seed0")
    (run / "checkpoints" / "ckpt-0000000064.ckpt").unlink()  # as if killed after step 2
    proc = run_train([*args, "resume=auto", "log_every_n_steps=1", "logger=none"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from" in proc.stdout and "ckpt-0000000032.ckpt" in proc.stdout
    assert len(list((tmp_path / "runs" / "train").iterdir())) == 2  # the run and its readable link
    assert (tmp_path / "runs" / "train" / "quickstart_rho0.9_seed0").resolve() == run
    # a setting that changes the weights cannot continue this run: refused, naming the key and both values
    ckpt = run / "checkpoints" / "ckpt-0000000064.ckpt"
    proc = run_train([*args, "optimizer.lr=1e-4", f"ckpt_path={ckpt}", "name=other"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("biasamp.train")]
    assert len(lines) == 1 and "optimizer.lr is 0.001 in the checkpoint but 0.0001 in this run" in lines[0]
    assert "Traceback" not in proc.stderr and not list((tmp_path / "runs" / "train").glob("other*"))


# ---------------------------------------------------------------------------------------------- lock
def test_a_second_process_on_a_run_folder_gets_one_line(tmp_path):
    args = [*QUICK, "trainer.max_steps=2"]
    folder = tmp_path / "runs" / "train" / _folder(args)
    with folder_lock(folder, "a test"):
        proc = run_train(args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is in use by process" in lines[0], proc.stderr[-2000:]
    assert not (folder / "checkpoints").exists()


def test_a_refused_process_never_removes_a_lock_another_process_holds(tmp_path):
    from biasamp.apps import remove_empty_folders
    from biasamp.identity import LOCK_NAME, remove_released_lock

    folder = tmp_path / "runs" / "train" / "new-run"
    with folder_lock(folder, "a test"):  # a run still in its setup: the lock is all its folder holds yet
        assert remove_released_lock(folder) is False
        remove_empty_folders(folder, stop=tmp_path)  # what a refused second process does on its way out
        assert (folder / LOCK_NAME).is_file()
    remove_empty_folders(folder, stop=tmp_path)  # released: now it goes, with its empty parents
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, child", [({}, False), ({"LOCAL_RANK": "1"}, True), ({"RANK": "3"}, True),
                                        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False),
                                        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, True),
                                        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False)])
def test_only_global_rank_zero_locks_and_decides(env, child, monkeypatch):
    from biasamp.launch import is_child_rank

    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_child_rank() is child


def test_callbacks_other_than_checkpoint_cadence_are_part_of_the_identity():
    swa = "+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging"
    assert _folder([*QUICK, swa, "+callbacks.swa.swa_lrs=0.01"]) != _folder(QUICK)


# ---------------------------------------------------------------------------------------------- stop and resume
def test_sigterm_snapshots_exits_nonzero_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*QUICK, "trainer.max_steps=120", "logger.flush_logs_every_n_steps=1",
            "callbacks.checkpoint.ckpt_every_kimg=10", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "BIASAMP_OUTPUT_DIR": str(tmp_path / "b" / "runs")}
    (tmp_path / "b").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "biasamp.train", *args], cwd=tmp_path / "b", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "b" / "runs" / "train").glob("*/logs/metrics.csv"))
        if found and len(found[0].read_text().splitlines()) >= 3:  # header + 2 logging steps
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None and proc.poll() is None, "training did not start logging in time"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("biasamp.train")]
    assert len(lines) == 1 and "stopped at n_img=" in lines[0] and "resume=auto" in lines[0]
    run = metrics.parent.parent
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["snapshot.ckpt"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["finished"] is False and summary["stopped_by"] == "signal"
    stopped_at = summary["global_step"]
    assert 0 < stopped_at < 120
    assert metadata(load_checkpoint(run / "checkpoints" / "snapshot.ckpt"))["finished"] is False
    rows_before = _metrics(run)

    resumed = run_train([*args, "resume=auto"], cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run_train(args, cwd=tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]

    a = load_checkpoint(run_folder(tmp_path / "a" / "runs", "quickstart_rho0.9_seed0") / "checkpoints" /
                        "ckpt-0000001920.ckpt")
    b = load_checkpoint(run / "checkpoints" / "ckpt-0000001920.ckpt")
    assert metadata(b)["finished"] is True
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    # metrics.csv holds the rows of both parts, each logging step once
    rows = _metrics(run)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 120
    assert [r["step"] for r in rows_before if int(r["step"]) <= stopped_at] == \
        [r["step"] for r in rows if int(r["step"]) <= stopped_at]
    assert steps == [int(r["step"]) for r in _metrics(run_folder(tmp_path / "a" / "runs", "quickstart_rho0.9_seed0"))]


def test_max_time_leaves_an_unfinished_run_with_a_snapshot(tmp_path):
    proc = run_train([*QUICK, "trainer.max_steps=100000", "trainer.max_time=00:00:00:01"], cwd=tmp_path)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "not finished" in proc.stderr and "done" not in proc.stdout
    run = run_folder(tmp_path / "runs", "quickstart_rho0.9_seed0")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["snapshot.ckpt"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["finished"] is False and summary["stopped_by"] == "max_time"
    assert metadata(load_checkpoint(run / "checkpoints" / "snapshot.ckpt"))["finished"] is False


@pytest.mark.parametrize("value, ok", [("auto", True), (1, True), (3, True), (0, False), ("two", False),
                                       (True, False)])
def test_cpu_threads_setting(value, ok):
    from biasamp.apps import cpu_threads
    from biasamp.errors import UsageError

    if ok:
        n = cpu_threads(value)
        assert n >= 1 and (value == "auto" or n == value)
    else:
        with pytest.raises(UsageError, match="threads="):
            cpu_threads(value)
