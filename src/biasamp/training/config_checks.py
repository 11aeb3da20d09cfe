"""The training app's schema: every value is checked here, before any data is read or folder used, and a
wrong one stops the run with a UsageError whose one line names the key, the value and what is allowed.

The library that follows trusts what passed. Dataset keys are checked by the dataset's own builder, which runs
right after (before anything is written); loss keys by :func:`biasamp.models.check_loss_config`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from biasamp.apps import cpu_threads
from biasamp.errors import UsageError
from biasamp.identity import check_folder_name

TOP_KEYS = (
    "dataset", "model", "trainer", "logger", "callbacks", "paths", "rho", "seed", "name", "resume", "ckpt_path",
    "batch_size", "batch_gpu", "total_kimg", "data", "speed", "loss", "optimizer", "lr_schedule", "ema",
    "log_every_n_steps", "ema_loss_every_n_steps", "max_nonfinite_steps", "threads", "invdiff",
)
PRECISIONS = ("32-true", "32", "bf16-mixed")
REFUSED_PRECISIONS = {
    "16-mixed": "fp16 needs loss scaling, whose skipped steps would still advance n_img, the EMA and the lr; "
                "use bf16-mixed (same speed on tensor cores, no scaling) or 32-true",
    "16": "fp16 needs loss scaling; use bf16-mixed or 32-true",
    "bf16-true": "bf16 weights would freeze the fp32 EMA and lose small updates; use bf16-mixed (bf16 compute, "
                 "fp32 weights)",
    "16-true": "fp16 weights lose small updates; use bf16-mixed or 32-true",
    "transformer-engine": "not supported; use bf16-mixed or 32-true",
    "64-true": "not supported; use 32-true",
    "64": "not supported; use 32-true",
}
# trainer keys the app sets itself (from batch_size, batch_gpu, callbacks, logger, the run folder)
DERIVED_TRAINER_KEYS = ("accumulate_grad_batches", "callbacks", "logger", "default_root_dir", "log_every_n_steps",
                        "use_distributed_sampler", "limit_val_batches", "num_sanity_val_steps",
                        "enable_checkpointing", "enable_model_summary", "max_epochs", "min_steps", "min_epochs")


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = value[part] if isinstance(value, Mapping) and part in value else None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive(cfg: Mapping[str, Any], key: str, integer: bool = False, allow_zero: bool = False) -> None:
    value = _get(cfg, key)
    ok = (_is_int(value) if integer else _is_real(value)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a finite number"
        raise UsageError(f"{key}={value!r} is not allowed: must be {what} {'>= 0' if allow_zero else '> 0'}")


def _unknown_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """``section`` "" is the top level."""
    extra = sorted(set(given) - set(allowed))
    if extra:
        key, where = (f"{section}.{extra[0]}", section) if section else (extra[0], "the training app")
        raise UsageError(f"{key} is not a setting of {where} (allowed: {', '.join(sorted(allowed))}); "
                         "check the spelling")


def _target(section: str, node: Mapping[str, Any]) -> Callable[..., Any]:
    """The callable a ``_target_`` names, imported; UsageError when it cannot be."""
    path = node.get("_target_")
    if not isinstance(path, str) or "." not in path:
        raise UsageError(f"{section}._target_={path!r} is not allowed: give a dotted path such as torch.optim.Adam")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UsageError(f"{section}._target_={path} cannot be imported: check the spelling "
                         "(e.g. torch.optim.Adam, torch.optim.AdamW)") from None


def _parameters(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """(keyword parameters, whether it takes **kwargs) of a class or function."""
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_target_node(section: str, node: Mapping[str, Any], exclude: Sequence[str] = ()) -> None:
    fn = _target(section, node)
    names, var_kw = _parameters(fn)
    if not var_kw:
        _unknown_keys(section, node, [*names, "_target_", "_partial_", "_recursive_", "_convert_",
                                      *[k for k in node if k.startswith("_") and k.endswith("_")]])
    bad = [k for k in exclude if k in node]
    if bad:
        raise UsageError(f"{section}.{bad[0]} is set by biasamp itself; remove it")


def check_optimizer(cfg: Mapping[str, Any]) -> None:
    opt = cfg.get("optimizer") or {}
    _check_target_node("optimizer", opt, exclude=("params",))
    if opt.get("_partial_") is not True:
        raise UsageError("optimizer._partial_ must be true (biasamp passes the parameters)")
    _positive(cfg, "optimizer.lr")
    if "betas" in opt:
        betas = opt["betas"]
        ok = (isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
              and all(_is_real(b) and 0 <= b < 1 for b in betas))
        if not ok:
            raise UsageError(f"optimizer.betas={list(betas) if isinstance(betas, Sequence) else betas!r} is not "
                             "allowed: two numbers in [0, 1), e.g. [0.9, 0.999]")
    if "eps" in opt:
        _positive(cfg, "optimizer.eps")
    if "weight_decay" in opt:
        _positive(cfg, "optimizer.weight_decay", allow_zero=True)
    if "momentum" in opt and not (_is_real(opt["momentum"]) and 0 <= opt["momentum"] < 1):
        raise UsageError(f"optimizer.momentum={opt['momentum']!r} is not allowed: a number in [0, 1)")


def check_rho_value(rho: Any) -> None:
    """The top-level ``rho`` (it reaches the dataset through ``dataset.rho``): null, a number in [0, 1], or a
    list of them; the dataset's builder checks what its own ``rho`` keys allow."""
    values = list(rho) if isinstance(rho, Sequence) and not isinstance(rho, str) else [rho]
    for v in values:
        if v is not None and not (_is_real(v) and 0.0 <= float(v) <= 1.0):
            raise UsageError(f"rho={rho!r} is not allowed: a number in [0, 1], one per class, or null (Waterbirds "
                             "and BFFHQ: keep the split as it is)")


def world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """Processes the trainer will run: devices x num_nodes (devices an int or a list of ids)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1) or 1
    if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) > 0:
        n = len(devices)
    elif _is_int(devices) and devices >= 1:
        n = int(devices)
    else:
        raise UsageError(f"trainer.devices={devices!r} is not allowed: give a positive integer or a list of device "
                         "ids (biasamp needs the world size to split the global batch)")
    if not _is_int(nodes) or nodes < 1:
        raise UsageError(f"trainer.num_nodes={nodes!r} is not allowed: a positive integer")
    return n * int(nodes)


def batch_layout(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """(world, batch_gpu, accumulate) such that batch_size = batch_gpu * world * accumulate."""
    _positive(cfg, "batch_size", integer=True)
    world = world_size(cfg["trainer"])
    batch_size = int(cfg["batch_size"])
    if cfg.get("batch_gpu") is None:
        if batch_size % world:
            raise UsageError(f"batch_size={batch_size} is not divisible by the {world} devices; "
                             "choose a multiple of trainer.devices x trainer.num_nodes")
        return world, batch_size // world, 1
    _positive(cfg, "batch_gpu", integer=True)
    batch_gpu = int(cfg["batch_gpu"])
    if batch_size % (batch_gpu * world):
        raise UsageError(f"batch_size={batch_size} is not a multiple of batch_gpu x devices = "
                         f"{batch_gpu} x {world}; pick batch_gpu dividing batch_size / devices")
    return world, batch_gpu, batch_size // (batch_gpu * world)


def check_trainer(cfg: Mapping[str, Any]) -> None:
    import lightning as L
    import torch

    trainer = cfg.get("trainer") or {}
    if trainer.get("_target_") != "lightning.Trainer":
        raise UsageError(f"trainer._target_={trainer.get('_target_')!r} is not allowed: lightning.Trainer")
    names, _ = _parameters(L.Trainer.__init__)
    _unknown_keys("trainer", trainer, [*names, "_target_"])
    derived = [k for k in DERIVED_TRAINER_KEYS if k in trainer]
    if derived:
        raise UsageError(f"trainer.{derived[0]} is set by biasamp from batch_size, batch_gpu, callbacks and the "
                         "run folder; remove it (set those instead)")
    precision = str(trainer.get("precision", "32-true"))
    if precision in REFUSED_PRECISIONS:
        raise UsageError(f"trainer.precision={precision} is not allowed: {REFUSED_PRECISIONS[precision]}")
    if precision not in PRECISIONS:
        raise UsageError(f"trainer.precision={precision!r} is not allowed: use {' or '.join(PRECISIONS)}")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator={accelerator} but this machine has no CUDA GPU visible to torch; "
                         "use trainer=cpu (or check CUDA_VISIBLE_DEVICES and the torch build)")
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise UsageError(f"trainer.accelerator={accelerator!r} is not allowed: cpu, gpu (CUDA) or auto")
    max_steps = trainer.get("max_steps")
    if max_steps is not None and max_steps != -1:
        _positive(cfg, "trainer.max_steps", integer=True)
    if max_time_seconds(trainer.get("max_time")) is not None and "checkpoint" not in (cfg.get("callbacks") or {}):
        raise UsageError("trainer.max_time needs callbacks.checkpoint (it writes the snapshot and stops the run)")


def max_time_seconds(value: Any) -> float | None:
    """``trainer.max_time`` ("DD:HH:MM:SS", or null) in seconds; UsageError for anything else."""
    if value is None:
        return None
    parts = str(value).split(":")
    try:
        days, hours, minutes, seconds = (int(p) for p in parts)
        ok = len(parts) == 4 and min(days, hours, minutes, seconds) >= 0
    except ValueError:
        ok = False
    if not ok or days * 86400 + hours * 3600 + minutes * 60 + seconds <= 0:
        raise UsageError(f"trainer.max_time={value!r} is not allowed: a positive wall time DD:HH:MM:SS (e.g. "
                         "00:11:30:00), or null")
    return float(days * 86400 + hours * 3600 + minutes * 60 + seconds)


def check_callbacks(cfg: Mapping[str, Any]) -> None:
    callbacks = cfg.get("callbacks") or {}
    for key, node in callbacks.items():
        if node and "_target_" in node:
            _check_target_node(f"callbacks.{key}", node)
    if "checkpoint" in callbacks:
        _positive(cfg, "callbacks.checkpoint.ckpt_every_kimg")
        _positive(cfg, "callbacks.checkpoint.snapshot_every_min")


def check_logger(cfg: Mapping[str, Any]) -> None:
    logger = cfg.get("logger") or {}
    if not logger or "_target_" not in logger:
        return
    if "Wandb" in str(logger.get("_target_")):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("logger=wandb needs the wandb package: pip install -e '.[wandb]' "
                             "(or use logger=csv)") from None
    _check_target_node("logger", logger)


def check_resolution(cfg: Mapping[str, Any]) -> None:
    """The network must be the one meant for the dataset's image size."""
    model_res, data_res = _get(cfg, "model.img_resolution"), _get(cfg, "dataset.img_resolution")
    if model_res is None or data_res is None or model_res == data_res:
        return
    dataset = _get(cfg, "dataset.name")
    preset = {"waterbirds": "experiment=paper_waterbirds", "bffhq": "experiment=paper_bffhq"}.get(
        str(dataset), "model=ddpmpp_64" if data_res == 64 else "model=ddpmpp_bmnist")
    raise UsageError(f"model={_get(cfg, 'model.name')} is a {model_res} px network but dataset={dataset} gives "
                     f"{data_res} px images (dataset.img_resolution); use {preset}, or a model for {data_res} px")


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """Check everything that can be checked before data or models are built (UsageError on the first problem)."""
    from biasamp.models import check_loss_config
    from biasamp.speed import check_train_speed

    _unknown_keys("", {k: None for k in cfg}, TOP_KEYS)
    if cfg.get("name") is not None:
        check_folder_name("name", cfg.get("name"))
    check_rho_value(cfg.get("rho"))
    seed = cfg.get("seed")
    if not _is_int(seed) or seed < 0:
        raise UsageError(f"seed={seed!r} is not allowed: must be an integer >= 0")
    check_trainer(cfg)
    batch_layout(cfg)
    _positive(cfg, "total_kimg")
    check_optimizer(cfg)
    _check_target_node("lr_schedule", cfg.get("lr_schedule") or {})
    check_loss_config({k: v for k, v in (cfg.get("loss") or {}).items()})
    ema = cfg.get("ema") or {}
    _unknown_keys("ema", ema, ("halflife_kimg", "rampup_ratio"))
    _positive(cfg, "ema.halflife_kimg")
    if ema.get("rampup_ratio") is not None:
        _positive(cfg, "ema.rampup_ratio")
    _unknown_keys("data", cfg.get("data") or {}, ("on_device",))
    if not isinstance(_get(cfg, "data.on_device"), bool):
        raise UsageError(f"data.on_device={_get(cfg, 'data.on_device')!r} is not allowed: true or false")
    _positive(cfg, "log_every_n_steps", integer=True)
    _positive(cfg, "ema_loss_every_n_steps", integer=True, allow_zero=True)
    _positive(cfg, "max_nonfinite_steps", integer=True)
    every, log_every = cfg["ema_loss_every_n_steps"], cfg["log_every_n_steps"]
    if every and every % log_every:
        raise UsageError(f"ema_loss_every_n_steps={every} must be a multiple of log_every_n_steps={log_every}")
    if cfg.get("resume") not in (None, "auto"):
        raise UsageError(f"resume={cfg.get('resume')!r} is not allowed: use resume=auto or leave it null")
    if cfg.get("resume") is not None and cfg.get("ckpt_path") is not None:
        raise UsageError("give either resume=auto or ckpt_path=<file>, not both")
    check_train_speed(cfg.get("speed"))
    cpu_threads(cfg.get("threads"), "threads")
    check_callbacks(cfg)
    check_logger(cfg)
    if cfg.get("invdiff") is not None:
        from biasamp.training.invdiff import check_invdiff_config

        check_invdiff_config(cfg.get("invdiff"))
    else:
        check_resolution(cfg)  # InvDiff: the base's dataset and model (checked when it was trained)
    dropout = _get(cfg, "model.net.label_dropout")
    if dropout is not None and not (_is_real(dropout) and 0 <= dropout < 1):
        raise UsageError(f"model.net.label_dropout={dropout!r} is not allowed: a probability in [0, 1) (0: no "
                         "unconditional model, so the count app will refuse guidance for it)")
