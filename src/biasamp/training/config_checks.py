"""Start-up checks of the training config: every wrong value stops the run before any work,
with one line naming the key, the value, and what is allowed."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from biasamp.speed import SpeedConfigError, check_train_speed


class ConfigError(ValueError):
    """A config value that cannot work. The message is meant to be shown as is, on one line."""


def _number(cfg: Mapping[str, Any], key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = value[part] if isinstance(value, Mapping) and part in value else None
    return value


def _positive(cfg: Mapping[str, Any], key: str, integer: bool = False, allow_zero: bool = False) -> None:
    value = _number(cfg, key)
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is not allowed: must be {what} {bound}")


def check_rho(rho: Any, num_classes: int | None = None) -> None:
    values = list(rho) if isinstance(rho, Sequence) and not isinstance(rho, str) else [rho]
    for v in values:
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"rho={rho!r} is not allowed: rho must be in [0, 1] (a float, or one per class)")
    if num_classes is not None and len(values) > 1 and len(values) != num_classes:
        raise ConfigError(f"rho={rho!r} has {len(values)} values but the dataset has {num_classes} classes")


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes the trainer will run: devices x num_nodes (devices an int or a list of ids)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        n = len(devices)
    elif isinstance(devices, numbers.Integral) and not isinstance(devices, bool) and devices >= 1:
        n = int(devices)
    else:
        raise ConfigError(
            f"trainer.devices={devices!r} is not allowed: give a positive integer or a list of device ids "
            "(biasamp needs the world size to split the global batch)"
        )
    return n * int(nodes)


def batch_layout(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """(world, batch_gpu, accumulate) such that batch_size = batch_gpu * world * accumulate."""
    _positive(cfg, "batch_size", integer=True)
    world = world_size(cfg["trainer"])
    batch_size = int(cfg["batch_size"])
    if cfg.get("batch_gpu") is None:
        if batch_size % world:
            raise ConfigError(f"batch_size={batch_size} is not divisible by the {world} devices; "
                              "choose a multiple of trainer.devices x trainer.num_nodes")
        return world, batch_size // world, 1
    _positive(cfg, "batch_gpu", integer=True)
    batch_gpu = int(cfg["batch_gpu"])
    if batch_size % (batch_gpu * world):
        raise ConfigError(f"batch_size={batch_size} is not a multiple of batch_gpu x devices = "
                          f"{batch_gpu} x {world}; pick batch_gpu dividing batch_size / devices")
    return world, batch_gpu, batch_size // (batch_gpu * world)


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """Check everything that can be checked before data or models are built."""
    check_rho(cfg.get("rho"))
    seed = cfg.get("seed")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed: must be an integer >= 0")
    batch_layout(cfg)
    _positive(cfg, "total_kimg")
    max_steps = cfg["trainer"].get("max_steps")
    if max_steps is not None and max_steps != -1:
        _positive(cfg, "trainer.max_steps", integer=True)
    _positive(cfg, "optimizer.lr")
    _positive(cfg, "ema.halflife_kimg")
    if cfg["ema"].get("rampup_ratio") is not None:
        _positive(cfg, "ema.rampup_ratio")
    _positive(cfg, "log_every_n_steps", integer=True)
    _positive(cfg, "ema_loss_every_n_steps", integer=True, allow_zero=True)
    _positive(cfg, "max_nonfinite_steps", integer=True)
    every, log_every = cfg["ema_loss_every_n_steps"], cfg["log_every_n_steps"]
    if every and every % log_every:
        raise ConfigError(f"ema_loss_every_n_steps={every} must be a multiple of log_every_n_steps={log_every}")
    if cfg.get("resume") not in (None, "auto"):
        raise ConfigError(f"resume={cfg.get('resume')!r} is not allowed: use resume=auto or leave it null")
    if cfg.get("resume") is not None and cfg.get("ckpt_path") is not None:
        raise ConfigError("give either resume=auto or ckpt_path=<file>, not both")
    try:
        check_train_speed(cfg.get("speed"))
    except SpeedConfigError as err:
        raise ConfigError(str(err)) from None
    if "accumulate_grad_batches" in cfg["trainer"]:
        raise ConfigError("trainer.accumulate_grad_batches is derived from batch_size and batch_gpu; set those instead")
