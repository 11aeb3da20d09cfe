"""One training run, from a checked config to a finished (or cleanly stopped) run folder.

:func:`train` is everything the training app does: check the config, lock the run folder, decide between a new
run, a resume and "already finished", build data, denoiser, LightningModule and Trainer, fit, and write
train_summary.json. A run stopped by SIGTERM/SIGINT leaves a snapshot at a step boundary and raises
:class:`TrainingStopped`; ``resume=auto`` continues it exactly.
"""

from __future__ import annotations

import logging
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from biasamp.apps import set_cpu_threads
from biasamp.checkpoints import checkpoint_metadata, load_checkpoint, target_img
from biasamp.data import build_dataset
from biasamp.data.datamodule import InMemoryDataModule
from biasamp.errors import UsageError
from biasamp.identity import describe, differences, folder_lock, identity_hash
from biasamp.launch import is_child_rank, prepare_relaunch
from biasamp.models import build_denoiser
from biasamp.models.build import build_mixed_denoiser
from biasamp.speed import device_type, train_speed
from biasamp.training.checkpointing import CheckpointCallback, find_resume_checkpoint, remove_stale_temporaries
from biasamp.training.config_checks import batch_layout, check_train_config, max_time_seconds
from biasamp.training.invdiff import group_weights, resolve_invdiff
from biasamp.training.logging import METRICS_CSV, keep_rows_until
from biasamp.training.module import DiffusionModule, InvDiffModule
from biasamp.training.runs import (
    TrainSummary,
    plain_settings,
    point_latest_link,
    readable_name,
    train_identity,
    write_run_yaml,
)

# the EMA copy is a frozen submodule kept in eval mode on purpose
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# noise that says nothing about this run: lightning's own deprecation of a torch API, and an advertisement
warnings.filterwarnings("ignore", message=r".*isinstance.treespec, LeafSpec.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage())

# exit statuses of a run that stopped before its target (0 means finished)
EXIT_MAX_TIME = 75  # EX_TEMPFAIL: resume=auto continues


class TrainingStopped(Exception):
    """Training stopped before its target; ``status`` is the process exit status to use."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _interrupted(signum: int, frame: Any) -> None:
    raise TrainingStopped(f"stopped by {signal.Signals(signum).name} before training started; nothing to save",
                          128 + signum)


def _resume_path(cfg: DictConfig, ckpt_dir: Path) -> Path | None:
    if cfg.ckpt_path is not None:
        path = Path(str(cfg.ckpt_path)).expanduser()
        if not path.is_file():
            raise UsageError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
        return path
    found = find_resume_checkpoint(ckpt_dir)
    if cfg.resume == "auto":
        return found
    if found is not None and not is_child_rank():
        raise UsageError(f"run folder {ckpt_dir.parent} already holds checkpoints ({found.name}); "
                         "pass resume=auto to continue it, or name=<new name> for a new run")
    return None


def check_resumable(ckpt: dict[str, Any], module: DiffusionModule, path: Path, ident: dict[str, Any]) -> None:
    """A checkpoint trained with other settings (its identity differs) or another network shape stops the run
    before training, naming each difference."""
    hp = ckpt.get("hyper_parameters", {})
    old = hp.get("identity") or train_identity(hp.get("config", {}))
    diffs = differences(old, ident)
    if diffs:
        raise UsageError(f"cannot resume {path}: {describe(diffs, 'the checkpoint', 'this run')}; resume with the "
                         "checkpoint's settings, or start a new run (drop resume/ckpt_path)")
    state = module.state_dict()
    for k, v in ckpt["state_dict"].items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise UsageError(f"checkpoint {path} does not fit this model: {k} has shape {tuple(v.shape)}, "
                             f"the model expects {tuple(state[k].shape)}")
    missing = sorted(set(state) - set(ckpt["state_dict"]))
    if missing:
        raise UsageError(f"checkpoint {path} does not fit this model: it lacks {missing[0]} "
                         f"(and {len(missing) - 1} more entries)")


def _logger(cfg: DictConfig, run_dir: Path, ident: dict[str, Any]) -> Any:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    if "Wandb" in cfg.logger._target_:  # one wandb run per run folder, continued across resumes
        extra = {} if cfg.logger.get("id") else {"id": f"{run_dir.name[:40]}-{identity_hash(ident, 12)}",
                                                 "resume": "allow"}
        return instantiate(cfg.logger, **extra)
    return instantiate(cfg.logger)


@dataclass
class Setup:
    trainer: L.Trainer
    module: DiffusionModule
    datamodule: InMemoryDataModule
    checkpoints: CheckpointCallback | None
    resume_from: Path | None
    resumed_n_img: int
    resumed_step: int


def setup(cfg: DictConfig, run_dir: Path) -> Setup:
    """Build everything for a run; raises UsageError on bad input, before any training."""
    world, batch_gpu, accumulate = batch_layout(cfg)
    settings = resolve_invdiff(plain_settings(cfg))  # InvDiff: the base's dataset and model, the files' sha256
    ident = train_identity(settings)
    invdiff = settings.get("invdiff")
    if not is_child_rank():
        remove_stale_temporaries(run_dir / "checkpoints")
    resume_from = _resume_path(cfg, run_dir / "checkpoints")

    L.seed_everything(cfg.seed, workers=False, verbose=False)
    dataset = build_dataset(settings["dataset"])
    shape = {"img_resolution": dataset.img_resolution, "in_channels": dataset.in_channels,
             "label_dim": dataset.num_classes}
    weights = None
    if invdiff:
        weights, base_state = group_weights(invdiff, dataset)
        denoiser = build_mixed_denoiser(settings["model"], **shape, r=invdiff["r"], mix=invdiff["mix"],
                                        delta_channels=invdiff.get("delta_channels"), base_state=base_state)
    else:
        denoiser = build_denoiser(settings["model"], **shape)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.update({k: settings[k] for k in ("dataset", "model", "invdiff") if settings.get(k)})
    max_steps = target_img(config) // cfg.batch_size
    meta = checkpoint_metadata(config, ident, max_steps * cfg.batch_size, dataset)
    module_class, extra = (InvDiffModule, {"lam": float(invdiff["lam"])}) if invdiff else (DiffusionModule, {})
    module = module_class(
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
        metadata=meta,
        **train_speed(cfg.get("speed"), device_type(cfg.trainer.get("accelerator", "auto"))),
        **extra,
    )
    resumed_n_img = resumed_step = 0
    if resume_from is not None:
        resume_ckpt = load_checkpoint(resume_from)
        check_resumable(resume_ckpt, module, resume_from, ident)
        resumed_n_img = int(resume_ckpt["n_img"])
        resumed_step = int(resume_ckpt.get("global_step", resumed_n_img // cfg.batch_size))
    datamodule = InMemoryDataModule(dataset, batch_gpu=batch_gpu, seed=cfg.seed, on_device=cfg.data.on_device,
                                    weights=weights)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    trainer_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()}
    trainer_kwargs.pop("max_steps", None)
    max_time = trainer_kwargs.pop("max_time", None)  # the checkpoint callback stops at a step boundary
    strategy = trainer_kwargs.get("strategy")
    if accumulate > 1 and isinstance(strategy, dict) and strategy.get("static_graph"):
        # DDP's static graph breaks under no_sync(), which gradient accumulation uses (pytorch#143580)
        trainer_kwargs["strategy"] = {**strategy, "static_graph": False}
    trainer = instantiate(
        trainer_kwargs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=_logger(cfg, run_dir, ident),
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.log_every_n_steps,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    stopper = next((c for c in callbacks if isinstance(c, CheckpointCallback)), None)
    if stopper is not None:
        stopper.max_time_s = max_time_seconds(max_time)
    return Setup(trainer, module, datamodule, stopper, resume_from, resumed_n_img, resumed_step)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Check, lock, set up and fit one run in ``run_dir``; returns train_summary.json's content.

    Raises UsageError on bad input (before any work) and :class:`TrainingStopped` when the run stopped before its
    target (SIGTERM/SIGINT: snapshot written; trainer.max_time)."""
    check_train_config(cfg)
    previous = {s: signal.signal(s, _interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if is_child_rank():  # an extra DDP process: rank 0 holds the folder's lock
            return _train_locked(cfg, run_dir)
        with folder_lock(run_dir, "a training run"):
            return _train_locked(cfg, run_dir)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _train_locked(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu" or device_type(cfg.trainer.get("accelerator")) == "cpu":
        set_cpu_threads(cfg.get("threads", "auto"), "threads")
    s = setup(cfg, run_dir)
    trainer, module = s.trainer, s.module
    if trainer.is_global_zero:  # runs/train/<readable> -> this run (setup found no fault in its config)
        point_latest_link(run_dir, readable_name(plain_settings(cfg)))
    target = trainer.max_steps * module.batch_total
    if s.resume_from is not None and s.resumed_n_img >= target:
        # finished: touch nothing (counts keep their checkpoint's sha256)
        print(f"biasamp.train: {run_dir.name} is already finished (n_img={s.resumed_n_img}, {s.resume_from.name})")
        return {"run_dir": str(run_dir), "n_img": s.resumed_n_img, "already_finished": True, "finished": True}
    if trainer.is_global_zero:
        write_run_yaml(run_dir, module.hparams_initial)
        # rows after the checkpoint resumed from are trained again; a fresh start keeps none (a run killed before
        # its first checkpoint left rows that no checkpoint backs)
        keep_rows_until(run_dir / "logs" / METRICS_CSV, s.resumed_step)
    prepare_relaunch()
    if s.resume_from is not None and trainer.is_global_zero:
        print(f"biasamp.train: resuming from {s.resume_from} (n_img={s.resumed_n_img} of {target})")
    trainer.fit(module, datamodule=s.datamodule, ckpt_path=str(s.resume_from) if s.resume_from else None)
    stop_signal = s.checkpoints.stop_signal if s.checkpoints is not None else None
    n_img = int(module.n_img)
    finished = n_img >= target
    by_time = s.checkpoints is not None and s.checkpoints.stopped_by_time
    stopped_by = "target" if finished else "signal" if stop_signal else "max_time" if by_time else "other"
    summary = _summary(trainer, module, run_dir, finished, stopped_by, target)
    if trainer.is_global_zero:
        summary.write(run_dir)
    if not finished:
        why = (f"{signal.Signals(stop_signal).name}: snapshot saved" if stop_signal else
               "trainer.max_time reached: snapshot saved" if stopped_by == "max_time" else "training ended early")
        status = 128 + stop_signal if stop_signal else EXIT_MAX_TIME
        raise TrainingStopped(f"stopped at n_img={n_img} of {target} ({why}); not finished: rerun with "
                              "resume=auto to continue", status)
    if trainer.is_global_zero:
        print(f"biasamp.train: done: n_img={n_img} rho_data={summary.rho_data:.4f} "
              f"checkpoints in {run_dir / 'checkpoints'}")
    return summary.__dict__


def _summary(trainer: L.Trainer, module: DiffusionModule, run_dir: Path, finished: bool, stopped_by: str,
             target: int) -> TrainSummary:
    """Run facts, with per-rank fingerprints gathered from every process (equal weights, distinct RNG)."""
    mine = module.fingerprint()
    ranks = [mine]
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
    return TrainSummary(run_dir=str(run_dir), finished=finished, stopped_by=stopped_by, n_img=int(module.n_img),
                        target_img=int(target), global_step=int(trainer.global_step),
                        world_size=int(trainer.world_size), batch_total=int(module.batch_total),
                        rho_data=float(module.hparams["rho_data"]), ranks=ranks)
