"""The training app end to end: real configs composed, bad input stopped before work, checkpoints that load
back, resume equal to an uninterrupted run, multirun folders, and 2-process DDP on the CPU (gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from biasamp.checkpoints import ema_state_dict, load_checkpoint, load_denoiser
from biasamp.data import build_dataset
from biasamp.errors import UsageError
from biasamp.models import build_denoiser
from tests.conftest import CONF_DIR, compose_train, run_folder, run_train

QUICK = ["experiment=quickstart", "batch_size=16", "log_every_n_steps=2", "ema_loss_every_n_steps=2"]


def _ckpts(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("model", ["tiny", "ddpmpp_bmnist", "ddpmpp_32", "ddpmpp_64"])
def test_real_configs_compose_and_build(model):
    cfg = compose_train([f"model={model}", "dataset.classes_to_use=[0,1]", "rho=0.9"])
    data = build_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))
    assert data.rho_effective == pytest.approx(0.9, abs=1e-3)
    resolution = 64 if model == "ddpmpp_64" else 32
    denoiser = build_denoiser(OmegaConf.to_container(cfg.model), img_resolution=resolution, in_channels=3,
                              label_dim=data.num_classes)
    assert denoiser.label_dim == 2
    instantiate(cfg.loss)
    instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    instantiate(cfg.lr_schedule)


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
@pytest.mark.parametrize("logger", ["csv", "wandb", "none"])
def test_trainer_and_logger_groups_compose(trainer, logger, tmp_path):
    cfg = compose_train([f"trainer={trainer}", f"logger={logger}"], run_dir=tmp_path)
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer == "ddp":
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == "DDPStrategy"
    if logger == "none":
        assert not cfg.logger
    else:
        lg = instantiate(cfg.logger)
        assert Path(lg.save_dir) == tmp_path
        if logger == "wandb":
            assert cfg.logger.offline is True  # offline unless the user asks otherwise
            assert not any("key" in k.lower() for k in cfg.logger)  # secrets only from the environment


@pytest.mark.parametrize("launcher, target", [
    ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_launcher_configs_point_at_installed_plugins(launcher, target):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    get_class(target)  # the plugin is installed and the class exists


def test_unknown_group_options_are_refused():
    for override in ["dataset=nope", "model=nope", "trainer=nope"]:
        with pytest.raises(MissingConfigException):
            compose_train([override])


def test_setup_stops_bad_data_before_training(tmp_path):
    from biasamp.training.fit import setup

    cases = [
        (["dataset.classes_to_use=[0,12]"], "12"),
        (["dataset=waterbirds", f"paths.data_dir={tmp_path}"], "metadata.csv"),
        (["dataset.source=torchvision", f"paths.data_dir={tmp_path}"], "train-images-idx3-ubyte"),
        (["dataset.class_size=100000"], "class_size"),
        (["model.net.model_channels=0"], "model_channels"),
    ]
    for overrides, needle in cases:
        cfg = compose_train(overrides, run_dir=tmp_path / "run")
        with pytest.raises(UsageError) as err:
            setup(cfg, tmp_path / "run")
        assert needle in str(err.value), (overrides, str(err.value))
        assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = run_train(["rho=1.5", *QUICK], cwd=tmp_path)
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err_lines == ["biasamp.train: error: rho=1.5 is not allowed: a number in [0, 1], one per class, or "
                         "null (Waterbirds and BFFHQ: keep the split as it is)"]
    assert not (tmp_path / "runs").exists()  # a refused start leaves no folder
    proc = run_train(["dataset=waterbirds", "rho=0.95"], cwd=tmp_path)  # the README's first Waterbirds mistake
    assert proc.returncode == 2
    assert "use experiment=paper_waterbirds" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # 2 min; resume == uninterrupted is also checked in the default set (test_train_runs: SIGTERM)
def test_train_checkpoint_resume_equals_uninterrupted(tmp_path):
    """Kept checkpoints every 64 images (4 steps); 'kill' one run after step 4 by deleting what came later,
    resume it with resume=auto, and compare with the uninterrupted run: same n_img, weights, EMA, optimizer."""
    args = [*QUICK, "trainer.max_steps=8", "callbacks.checkpoint.ckpt_every_kimg=0.064"]
    full = run_train(args, cwd=tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]
    run_a = run_folder(tmp_path / "a" / "runs", "quickstart_rho0.9_seed0")
    assert [p.name for p in _ckpts(run_a)] == ["ckpt-0000000064.ckpt", "ckpt-0000000128.ckpt"]

    part = run_train(args, cwd=tmp_path / "b")
    assert part.returncode == 0, part.stderr[-3000:]
    run_b = run_folder(tmp_path / "b" / "runs", "quickstart_rho0.9_seed0")
    (run_b / "checkpoints" / "ckpt-0000000128.ckpt").unlink()  # as if killed after step 4
    # a new run into a folder with checkpoints is refused, nothing is overwritten
    again = run_train(args, cwd=tmp_path / "b")
    assert again.returncode == 2 and "resume=auto" in again.stderr
    resumed = run_train([*args, "resume=auto"], cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "ckpt-0000000064.ckpt" in resumed.stdout

    # a finished run resumed again does nothing and rewrites no checkpoint
    final = run_b / "checkpoints" / "ckpt-0000000128.ckpt"
    stamp = final.stat().st_mtime_ns
    again = run_train([*args, "resume=auto"], cwd=tmp_path / "b")
    assert again.returncode == 0 and "already finished" in again.stdout
    assert final.stat().st_mtime_ns == stamp

    a = load_checkpoint(run_a / "checkpoints" / "ckpt-0000000128.ckpt")
    b = load_checkpoint(run_b / "checkpoints" / "ckpt-0000000128.ckpt")
    assert a["n_img"] == b["n_img"] == 128 and a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    ema_a, ema_b = ema_state_dict(a), ema_state_dict(b)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    mom_a = a["optimizer_states"][0]["state"][0]["exp_avg"]
    assert torch.equal(mom_a, b["optimizer_states"][0]["state"][0]["exp_avg"])

    # the checkpoint is self-contained: the EMA denoiser rebuilds from it alone and matches its weights
    denoiser, meta = load_denoiser(run_a / "checkpoints" / "ckpt-0000000128.ckpt")
    assert meta["rho_data"] == pytest.approx(0.9) and meta["n_img"] == 128
    assert meta["class_names"] == ["0", "1"] and meta["bias_names"] == ["red", "green"]
    assert all(torch.equal(v, ema_a[k]) for k, v in denoiser.state_dict().items())
    x = torch.zeros(2, 3, 32, 32)
    assert denoiser(x, torch.tensor([1.0, 2.0])).shape == x.shape

    # a checkpoint from another model shape is refused before training
    first = run_a / "checkpoints" / "ckpt-0000000064.ckpt"
    other = run_train([*args, "model.net.model_channels=16", f"ckpt_path={first}", "name=other"], cwd=tmp_path / "b")
    assert other.returncode == 2
    assert "model.net" in other.stderr and "Traceback" not in other.stderr
    # ... and so is one trained on other data (a setting the run name does not show)
    other = run_train([*args, "dataset.class_size=100", f"ckpt_path={first}", "name=other2"], cwd=tmp_path / "c")
    assert other.returncode == 2
    assert "dataset.class_size is None in the checkpoint but 100 in this run" in other.stderr
    assert "Traceback" not in other.stderr

    metrics = (run_a / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"n_img", "train/loss", "train/grad_norm", "lr", "train/ema_loss"} <= set(header)
    n_img_col = [int(float(row.split(",")[header.index("n_img")])) for row in metrics[1:]]
    assert n_img_col == sorted(n_img_col) and n_img_col[-1] == 128


def test_multirun_gives_one_folder_per_rho(tmp_path):
    proc = run_train(["-m", "rho=0.9,0.99", *QUICK, "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rho in (0.9, 0.99):
        run = run_folder(tmp_path / "runs", f"quickstart_rho{rho}_seed0")
        recorded = yaml.safe_load((run / "run.yaml").read_text())
        assert recorded["rho_data"] == pytest.approx(rho, abs=1e-9)
        assert recorded["data"]["n_aligned"] == 2 * int(400 * rho + 1e-9)
        assert len(_ckpts(run)) == 1
        # the formats, pinned: run.yaml holds the checkpoint metadata; train_summary.json where the run stands
        assert sorted(recorded) == ["bias_names", "class_names", "config", "data", "identity", "img_resolution",
                                    "in_channels", "label_dim", "label_dropout", "rho_data", "target_img"]
        assert recorded["target_img"] == 2 * 16 and recorded["identity"]["dataset.rho"] == rho
        summary = json.loads((run / "train_summary.json").read_text())
        assert sorted(summary) == ["batch_total", "finished", "global_step", "n_img", "ranks", "rho_data", "run_dir",
                                   "stopped_by", "target_img", "world_size"]
        assert summary["finished"] is True and summary["stopped_by"] == "target" and summary["n_img"] == 32
        meta = load_checkpoint(_ckpts(run)[0])["hyper_parameters"]
        assert sorted(meta) == sorted(recorded)


def test_ddp_static_graph_only_without_accumulation(tmp_path):
    from biasamp.training.fit import setup

    base = [*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    for extra, static in (([], True), (["batch_gpu=4"], False)):  # 16 = 4 x 2 devices x 2 accumulation rounds
        trainer = setup(compose_train([*base, *extra], run_dir=tmp_path / "run"), tmp_path / "run").trainer
        assert trainer.strategy._ddp_kwargs["static_graph"] is static, extra


def test_ddp_with_accumulation_on_cpu(tmp_path):
    """Two ranks that each accumulate two micro-batches: DDP's static graph would break under no_sync()."""
    proc = run_train([*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "batch_gpu=4",
                      "trainer.precision=32-true", "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_folder(tmp_path / "runs", "quickstart_rho0.9_seed0") / "train_summary.json").read_text())
    assert summary["n_img"] == 2 * 16
    r0, r1 = summary["ranks"]
    assert r0["weights_sum"] == r1["weights_sum"]  # the gradients were all-reduced


def test_ddp_two_processes_on_cpu(tmp_path):
    proc = run_train([*QUICK, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3"],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_folder(tmp_path / "runs", "quickstart_rho0.9_seed0")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["n_img"] == 3 * 16  # the global batch of 16 = 8 per rank, both ranks counted
    r0, r1 = summary["ranks"]
    assert r0["weights_sum"] == r1["weights_sum"] and r0["weights_abs_sum"] == r1["weights_abs_sum"]
    assert r0["ema_sum"] == r1["ema_sum"]
    assert r0["rng_digest"] != r1["rng_digest"]  # each rank drew its own noise
    assert r0["last_loss"] != r1["last_loss"]
    assert load_checkpoint(_ckpts(run)[-1])["n_img"] == 48
    assert not list(tmp_path.glob("outputs"))
    assert [p for p in (tmp_path / "runs" / "train").iterdir() if not p.is_symlink()] == [run]
