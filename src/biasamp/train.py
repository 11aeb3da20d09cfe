"""Training app: ``python -m biasamp.train [dataset=...] [model=...] [rho=...] [experiment=...]``.

Composes the dataset, the EDM-preconditioned DDPM++ denoiser, the LightningModule and the Trainer from
the Hydra config (conf/train.yaml) and fits. Every config value is checked before any work; a bad value
stops the run with one line on stderr and exit status 2.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from biasamp.atomic import atomic_write_json, atomic_write_text
from biasamp.checkpoints import load_checkpoint
from biasamp.data import build_dataset
from biasamp.data.datamodule import InMemoryDataModule
from biasamp.launch import ddp_job, is_child_rank, prepare_relaunch
from biasamp.models import build_denoiser
from biasamp.speed import device_type, train_speed
from biasamp.training import (
    ConfigError,
    DiffusionModule,
    NonFiniteLossError,
    check_train_config,
    find_resume_checkpoint,
)
from biasamp.training.config_checks import batch_layout

# the EMA copy is a frozen submodule kept in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

SETUP_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotImplementedError, ImportError)


def _resume_path(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
        return path
    found = find_resume_checkpoint(ckpt_dir)
    if cfg.resume == "auto":
        return found
    if found is not None and not is_child_rank():
        raise ConfigError(
            f"run folder {ckpt_dir.parent} already holds checkpoints ({found.name}); "
            "pass resume=auto to continue it, or name=<new name> for a new run"
        )
    return None


def _setting_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, this run's value) of each setting a resumed run must share with its
    checkpoint and does not: the network (model.net, .img_resolution, .name, where both name it), every
    dataset key but where the files live (a run name that hides one, e.g. dataset.rho_right, must not silently
    continue another run), rho and seed."""
    old_model, new_model = old.get("model") or {}, new.get("model") or {}
    pairs = [(f"model.{k}", old_model.get(k), new_model.get(k)) for k in ("net", "img_resolution", "name")
             if old_model.get(k) is not None and new_model.get(k) is not None]
    old_data, new_data = old.get("dataset") or {}, new.get("dataset") or {}
    pairs += [(f"dataset.{k}", old_data.get(k), new_data.get(k)) for k in sorted(set(old_data) | set(new_data))
              if k not in ("data_dir", "download")]
    pairs += [(k, old.get(k), new.get(k)) for k in ("rho", "seed") if k in old]
    return [(k, a, b) for k, a, b in pairs if a != b]


def _check_compatible(ckpt: dict[str, Any], module: DiffusionModule, path: Path) -> None:
    """A checkpoint from a different network shape or other data stops the run before training, naming the
    difference."""
    differences = _setting_differences(ckpt.get("hyper_parameters", {}).get("config", {}), module.hparams["config"])
    if differences:
        key, a, b = differences[0]
        raise ConfigError(f"checkpoint {path} was trained with {key}={a}, this run has {b}; resume with the "
                          "checkpoint's settings, or give this run its own folder with name=<new name>")
    state = module.state_dict()
    for k, v in ckpt["state_dict"].items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"checkpoint {path} does not fit this model: {k} has shape {tuple(v.shape)}, "
                              f"the model expects {tuple(state[k].shape)}")
    missing = sorted(set(state) - set(ckpt["state_dict"]))
    if missing:
        raise ConfigError(f"checkpoint {path} does not fit this model: it lacks {missing[0]} "
                          f"(and {len(missing) - 1} more entries)")


def _logger(cfg: DictConfig) -> Any:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if "Wandb" in cfg.logger._target_:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ImportError("logger=wandb needs the wandb package: pip install -e '.[wandb]' "
                              "(or use logger=csv)") from err
    return instantiate(cfg.logger)


def setup(cfg: DictConfig, run_dir: Path) -> tuple[L.Trainer, DiffusionModule, InMemoryDataModule, Path | None, int]:
    """Build everything for a run; raises one of SETUP_ERRORS on bad input, before any training.

    Returns the trainer, module, data, the checkpoint to resume from (or None) and the images it has seen (0).
    """
    check_train_config(cfg)
    world, batch_gpu, accumulate = batch_layout(cfg)
    resume_from = _resume_path(cfg, run_dir / "checkpoints")

    L.seed_everything(cfg.seed, workers=False, verbose=False)
    dataset = build_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))
    denoiser = build_denoiser(
        OmegaConf.to_container(cfg.model, resolve=True),
        img_resolution=dataset.img_resolution,
        in_channels=dataset.in_channels,
        label_dim=dataset.num_classes,
    )
    max_steps = cfg.trainer.max_steps
    if max_steps is None or max_steps == -1:
        max_steps = math.ceil(cfg.total_kimg * 1000 / cfg.batch_size)
    metadata = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": dataset.summary(),
        "label_dim": dataset.num_classes,
        "img_resolution": dataset.img_resolution,
        "in_channels": dataset.in_channels,
        "class_names": list(dataset.class_names),
        "bias_names": list(dataset.bias_names),
        "rho_data": float(dataset.rho_effective),
    }
    module = DiffusionModule(
        denoiser=denoiser,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        lr_schedule=instantiate(cfg.lr_schedule),
        batch_total=cfg.batch_size,
        total_img=max_steps * cfg.batch_size,
        ema_halflife_kimg=cfg.ema.halflife_kimg,
        ema_rampup_ratio=cfg.ema.rampup_ratio,
        seed=cfg.seed,
        log_every_n_steps=cfg.log_every_n_steps,
        ema_loss_every_n_steps=cfg.ema_loss_every_n_steps,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        metadata=metadata,
        **train_speed(cfg.get("speed"), device_type(cfg.trainer.get("accelerator", "auto"))),
    )
    resumed_n_img = 0
    if resume_from is not None:
        resume_ckpt = load_checkpoint(resume_from)
        _check_compatible(resume_ckpt, module, resume_from)
        resumed_n_img = int(resume_ckpt["n_img"])
    datamodule = InMemoryDataModule(dataset, batch_gpu=batch_gpu, seed=cfg.seed, on_device=cfg.data.on_device)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    trainer_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()}
    trainer_kwargs.pop("max_steps", None)
    strategy = trainer_kwargs.get("strategy")
    if accumulate > 1 and isinstance(strategy, dict) and strategy.get("static_graph"):
        # DDP's static graph breaks under no_sync(), which gradient accumulation uses (pytorch#143580)
        trainer_kwargs["strategy"] = {**strategy, "static_graph": False}
    trainer = instantiate(
        trainer_kwargs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=_logger(cfg),
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.log_every_n_steps,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    return trainer, module, datamodule, resume_from, resumed_n_img


def run(cfg: DictConfig) -> dict[str, Any]:
    with ddp_job():
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        trainer, module, datamodule, resume_from, done_img = setup(cfg, run_dir)
    except SETUP_ERRORS as err:
        print(f"biasamp.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    if resume_from is not None and done_img >= trainer.max_steps * module.batch_total:
        # finished: touch nothing (counts keep their checkpoint's sha256)
        print(f"biasamp.train: {run_dir.name} is already finished (n_img={done_img}, {resume_from.name})")
        return {"run_dir": str(run_dir), "n_img": done_img, "already_finished": True}
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "run.yaml", OmegaConf.to_yaml(OmegaConf.create(dict(module.hparams_initial))))
    prepare_relaunch()
    if resume_from is not None and trainer.is_global_zero:
        print(f"biasamp.train: resuming from {resume_from}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except NonFiniteLossError as err:
        print(f"biasamp.train: error: {err}", file=sys.stderr)
        sys.exit(3)
    summary = _summary(trainer, module, run_dir)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "train_summary.json", summary)
        print(f"biasamp.train: done: n_img={summary['n_img']} rho_data={summary['rho_data']:.4f} "
              f"checkpoints in {run_dir / 'checkpoints'}")
    return summary


def _summary(trainer: L.Trainer, module: DiffusionModule, run_dir: Path) -> dict[str, Any]:
    """Run facts, with per-rank fingerprints gathered from every process (equal weights, distinct RNG)."""
    mine = module.fingerprint()
    ranks = [mine]
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
    return {
        "run_dir": str(run_dir),
        "n_img": int(module.n_img),
        "global_step": int(trainer.global_step),
        "world_size": int(trainer.world_size),
        "batch_total": int(module.batch_total),
        "rho_data": float(module.hparams["rho_data"]),
        "ranks": ranks,
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
