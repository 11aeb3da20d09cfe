"""The count app's schema: every setting of conf/count.yaml checked once, before any folder or model.

:func:`check_count_config` turns the composed config into :class:`CountSettings` (typed, resolved) or raises
:class:`~biasamp.errors.UsageError` with one line naming the key, the value, what is allowed and what to do.
What needs the checkpoint's metadata (its classes, sigma range, whether it finished, its label dropout) is
checked by :func:`check_against_checkpoint`, still before the model is built.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from biasamp.errors import UsageError
from biasamp.identity import check_folder_name
from biasamp.sampling import UNCOND_MODES, check_sampler_config, resolve_sampler_config
from biasamp.sampling.steering import STEER_BRANCHES, STEER_LOSSES
from biasamp.speed import COMPILE_MODES, PRECISIONS, device_type

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
EXPORT_MATRIX = (None, "wide", "seed")
CHECKPOINT_HELP = "checkpoint=<ckpt file or runs/train/<run> folder>"


@dataclass(frozen=True)
class CountSettings:
    """A checked count config (see conf/count.yaml); ``options`` is the whole config as plain data."""

    checkpoint: Path
    n_per_class: int
    classes: list[str] | None
    include_uncond: bool
    batch_size: int | str  # an integer, or "auto"
    seed: int
    guidance: float
    guidance_uncond: str
    guidance_interval: tuple[float, float] | None
    class_oracle: Path | None
    precision: str  # resolved: fp32 | bf16
    compile: bool | str
    compile_mode: str
    channels_last: bool | str
    save_grid: bool
    grid_per_class: int
    export_matrix: str | None
    ci_level: float
    accelerator: str
    devices: int
    num_nodes: int
    sampler: dict[str, Any]  # as given (null sigma_min / sigma_max: the model's)
    oracle: dict[str, Any]
    allow_unfinished: bool
    progress: bool
    options: dict[str, Any]
    steer: dict[str, Any] | None = None  # checked steering settings (heads: a resolved path), None: no steering


def _refuse(key: str, value: Any, allowed: str) -> UsageError:
    return UsageError(f"{key}={value!r} is not allowed: {allowed}")


def _int(options: Mapping[str, Any], key: str, minimum: int) -> int:
    value = _get(options, key)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise _refuse(key, value, f"must be an integer >= {minimum}")
    return int(value)


def _bool(options: Mapping[str, Any], key: str) -> bool:
    value = _get(options, key)
    if not isinstance(value, bool):
        raise _refuse(key, value, "must be true or false")
    return value


def _get(options: Mapping[str, Any], key: str) -> Any:
    value: Any = options
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _existing_file(key: str, value: Any, what: str) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UsageError(f"{key}={value} does not exist (or is not a file); give {what}")
    return path.resolve()


def _sampler(sampler: Any, **model_range: float) -> None:
    """check_sampler_config, its refusal as a UsageError (sampling's checks raise ValueError for now)."""
    try:
        check_sampler_config(sampler, **model_range)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _guidance(options: Mapping[str, Any]) -> tuple[float, str, tuple[float, float] | None]:
    guidance = options.get("guidance")
    if not _real(guidance) or guidance < 0:
        raise _refuse("guidance", guidance, "the guidance scale w must be a finite number >= 0 "
                      "(D = (1 + w) D_cond - w D_uncond; 0 is plain conditional sampling)")
    uncond = "null" if options.get("guidance_uncond") is None else options.get("guidance_uncond")
    if uncond not in UNCOND_MODES:
        raise _refuse("guidance_uncond", options.get("guidance_uncond"), "use null or class_mean")
    interval = options.get("guidance_interval")
    if interval is not None:
        ok = (isinstance(interval, list) and len(interval) == 2 and all(_real(v) for v in interval)
              and 0 <= interval[0] < interval[1])
        if not ok:
            raise _refuse("guidance_interval", interval, "give [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi "
                          "(finite), or null")
        interval = (float(interval[0]), float(interval[1]))
    return float(guidance), str(uncond), interval


def _device(options: Mapping[str, Any]) -> tuple[str, int, int, str]:
    """fabric.accelerator, devices, num_nodes and the resolved precision; a GPU asked for without CUDA is
    refused here."""
    accelerator = _get(options, "fabric.accelerator")
    if accelerator not in ACCELERATORS:
        raise _refuse("fabric.accelerator", accelerator, f"use one of {', '.join(ACCELERATORS)}")
    devices, num_nodes = _int(options, "fabric.devices", 1), _int(options, "fabric.num_nodes", 1)
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise _refuse("fabric.accelerator", accelerator, "this machine has no CUDA GPU; use "
                          "fabric.accelerator=cpu (or auto), or run on a machine with a GPU")
        if devices > available:
            raise _refuse("fabric.devices", devices, f"this machine has {available} CUDA GPU(s)")
    precision = options.get("precision")
    if precision not in PRECISIONS:
        raise _refuse("precision", precision, "use fp32, bf16 or auto (auto: bf16 on CUDA, fp32 on the CPU)")
    if precision == "auto":
        precision = "bf16" if device_type(accelerator) == "cuda" else "fp32"
    for key in ("compile", "channels_last"):
        if not (isinstance(options.get(key), bool) or options.get(key) == "auto"):
            raise _refuse(key, options.get(key), "use true, false or auto (auto: on for CUDA)")
    if options.get("compile_mode") not in COMPILE_MODES:
        raise _refuse("compile_mode", options.get("compile_mode"), f"use one of {', '.join(COMPILE_MODES)}")
    return str(accelerator), devices, num_nodes, str(precision)


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain resolved data, without ``paths`` (where outputs go; it can name Hydra's run folder,
    which only exists inside the app)."""
    if not OmegaConf.is_config(cfg):
        return {k: v for k, v in cfg.items() if k != "paths"}
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "paths"}


TOP_KEYS = ("checkpoint", "allow_unfinished", "n_per_class", "classes", "include_uncond", "batch_size", "seed",
            "guidance", "guidance_uncond", "guidance_interval", "class_oracle", "precision", "compile", "compile_mode",
            "channels_last", "save_grid", "grid_per_class", "export_matrix", "ci_level", "progress", "fabric",
            "sweep_name", "sampler", "oracle", "steer")
STEER_KEYS = {
    "none": ("mode",),
    "distribution": ("mode", "heads", "target", "scale", "temperature", "batch", "sigma_window", "loss", "branches"),
    "sample": ("mode", "heads", "target", "scale", "temperature", "sigma_window", "branches"),
}
STEER_HELP = "python -m biasamp.hspace checkpoint=<the same checkpoint> writes one"


def check_steer(steer: Any) -> dict[str, Any] | None:
    """The steering settings checked (conf/steer/*.yaml), or None for mode none. What needs the heads file
    (its checkpoint, sigma grid, values; the target's values) is checked by the plan."""
    if steer is None:
        return None
    mode = steer.get("mode") if isinstance(steer, dict) else None
    if mode not in STEER_KEYS:
        raise _refuse("steer.mode", mode, "choose steer=none, steer=distribution or steer=sample")
    extra = sorted(set(steer) - set(STEER_KEYS[mode]))
    if extra:
        raise _refuse(f"steer.{extra[0]}", steer[extra[0]], f"not a setting of steer={mode} (its settings: "
                      f"{', '.join(STEER_KEYS[mode])})")
    if mode == "none":
        return None
    heads = steer.get("heads")
    if heads in (None, "", "???"):
        raise UsageError(f"steer.heads is required for steer={mode}: the heads.pt of the h-space heads; "
                         f"{STEER_HELP}")
    out = {**steer, "heads": _existing_file("steer.heads", heads, f"a heads.pt ({STEER_HELP})")}
    scale = steer.get("scale")
    if not _real(scale) or scale < 0:
        raise _refuse("steer.scale", scale, "the step size must be a finite number >= 0")
    temperature = steer.get("temperature")
    if not _real(temperature) or temperature <= 0:
        raise _refuse("steer.temperature", temperature, "must be a finite number > 0 (the released code's 8)")
    window = steer.get("sigma_window")
    if window is not None:
        ok = (isinstance(window, list) and len(window) == 2 and all(_real(v) for v in window)
              and 0 <= window[0] <= window[1])
        if not ok:
            raise _refuse("steer.sigma_window", window, "give [sigma_lo, sigma_hi] with 0 <= sigma_lo <= sigma_hi, "
                          "or null (steer at every evaluation)")
    if steer.get("branches") not in STEER_BRANCHES:
        raise _refuse("steer.branches", steer.get("branches"), f"use one of {', '.join(STEER_BRANCHES)}")
    target = steer.get("target")
    if mode == "distribution":
        batch = steer.get("batch")
        if not isinstance(batch, numbers.Integral) or isinstance(batch, bool) or batch < 2:
            raise _refuse("steer.batch", batch, "an integer >= 2: the samples whose attribute distribution is "
                          "steered together (the released code's 100)")
        if steer.get("loss") not in STEER_LOSSES:
            raise _refuse("steer.loss", steer.get("loss"), f"use one of {', '.join(STEER_LOSSES)}")
        if not (target in ("uniform", "data") or isinstance(target, list)):
            raise _refuse("steer.target", target, "uniform, data, a list of V shares (every class), or one such "
                          "list per class")
    elif target in (None, "", "???") or isinstance(target, list | dict | bool):
        raise _refuse("steer.target", target, "the name of one value of the heads' bias attribute (e.g. a colour)")
    return out


def check_count_config(cfg: DictConfig | Mapping[str, Any]) -> CountSettings:
    """Check every setting that needs no file but the named ones' existence; raises UsageError."""
    checkpoint = cfg.get("checkpoint") if not OmegaConf.is_config(cfg) or not OmegaConf.is_missing(
        cfg, "checkpoint") else None
    if checkpoint is None or str(checkpoint).strip() in ("", "???"):
        raise UsageError(f"checkpoint is required: python -m biasamp.count {CHECKPOINT_HELP}")
    options = _plain(cfg)
    unknown = sorted(set(options) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{unknown[0]} is not a setting of the count app (allowed: {', '.join(TOP_KEYS)}); check "
                         "the spelling")
    check_folder_name("sweep_name", options.get("sweep_name"))
    guidance, uncond, interval = _guidance(options)
    sampler = options.get("sampler")
    _sampler(sampler)
    accelerator, devices, num_nodes, precision = _device(options)
    batch_size = options.get("batch_size")
    if batch_size != "auto" and (not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool)
                                 or batch_size < 1):
        raise _refuse("batch_size", batch_size, "an integer >= 1 (samples per forward on each device), or auto "
                      "(the largest that fits on a GPU)")
    level = options.get("ci_level")
    if not _real(level) or not 0 < level < 1:
        raise _refuse("ci_level", level, "must be in (0, 1)")
    if options.get("export_matrix") not in EXPORT_MATRIX:
        raise _refuse("export_matrix", options.get("export_matrix"), "use null, wide or seed")
    classes = options.get("classes")
    if classes is not None and (not isinstance(classes, list) or not classes
                                or not all(isinstance(c, str | int) and not isinstance(c, bool) for c in classes)):
        raise _refuse("classes", classes, "null (every class) or a non-empty list of class names, e.g. ['0','1']")
    oracle = options.get("oracle")
    if not isinstance(oracle, dict) or "name" not in oracle:
        raise _refuse("oracle", oracle, "choose an oracle config: oracle=colour or oracle=classifier")
    if oracle["name"] == "classifier" and oracle.get("checkpoint") not in (None, "???"):
        oracle["checkpoint"] = str(_existing_file("oracle.checkpoint", oracle["checkpoint"],
                                                  "the oracle.ckpt written by python -m biasamp.oracle"))
    steer = check_steer(options.get("steer"))
    if steer is not None and options.get("include_uncond"):
        raise _refuse("include_uncond", True, f"steer={steer['mode']} steers class rows (the heads saw class-"
                      "conditional h); use include_uncond=false")
    if steer is not None and steer["mode"] == "distribution" and _int(options, "n_per_class", 1) % steer["batch"]:
        raise _refuse("n_per_class", options.get("n_per_class"), f"with steer=distribution it must be a multiple "
                      f"of steer.batch={steer['batch']} (blocks of sample indices [kB, (k+1)B) are steered together)")
    class_oracle = options.get("class_oracle")
    if class_oracle is not None:
        class_oracle = _existing_file("class_oracle", class_oracle, "an oracle.ckpt trained with attribute=target")
    return CountSettings(
        checkpoint=Path(str(checkpoint)).expanduser(), n_per_class=_int(options, "n_per_class", 1),
        classes=None if classes is None else [str(c) for c in classes],
        include_uncond=_bool(options, "include_uncond"), batch_size=batch_size, seed=_int(options, "seed", 0),
        guidance=guidance, guidance_uncond=uncond, guidance_interval=interval, class_oracle=class_oracle,
        precision=precision, compile=options.get("compile"), compile_mode=options.get("compile_mode"),
        channels_last=options.get("channels_last"), save_grid=_bool(options, "save_grid"),
        grid_per_class=_int(options, "grid_per_class", 0), export_matrix=options.get("export_matrix"),
        ci_level=float(level), accelerator=accelerator, devices=devices, num_nodes=num_nodes, sampler=dict(sampler),
        oracle=oracle, allow_unfinished=_bool(options, "allow_unfinished"), progress=_bool(options, "progress"),
        options=options, steer=steer)


def check_against_checkpoint(settings: CountSettings, meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """What the checkpoint's metadata decides: it finished training (or ``allow_unfinished=true``), it has an
    unconditional model when guidance or the ``uncond`` row needs one, the sampler's sigma range lies inside the
    model's, the classes exist. Returns the resolved sampler (every parameter; null sigmas as the model's)."""
    if not meta["finished"] and not settings.allow_unfinished:
        raise UsageError(f"checkpoint {path} is unfinished ({meta['n_img']} of {meta['target_img']} training "
                         "images); finish training it (python -m biasamp.train ... resume=auto), or pass "
                         "allow_unfinished=true to count it anyway")
    if meta["label_dropout"] == 0 and (settings.guidance > 0 or settings.include_uncond):
        key, value = ("guidance", settings.guidance) if settings.guidance > 0 else ("include_uncond", True)
        raise _refuse(key, value, f"checkpoint {path} was trained with label_dropout=0, so it has no unconditional "
                      "model (null label); use guidance=0 and include_uncond=false, or a checkpoint trained with "
                      "label dropout")
    model = meta["config"].get("model") or {}
    lo, hi = float(model.get("sigma_min", 0.002)), float(model.get("sigma_max", 80.0))
    _sampler(settings.sampler, model_sigma_min=lo, model_sigma_max=hi)
    sampler = resolve_sampler_config(settings.sampler)
    for key, default in (("sigma_min", lo), ("sigma_max", hi)):
        value = sampler[key]
        if value is not None and not lo <= value <= hi:
            raise _refuse(f"sampler.{key}", value, f"must lie in the model's sigma range [{lo:g}, {hi:g}], or be "
                          "null (the model's value)")
        sampler[key] = float(default if value is None else value)
    class_names = [str(c) for c in meta["class_names"]]
    unknown = [c for c in settings.classes or [] if c not in class_names]
    if unknown:
        raise _refuse("classes", settings.classes, f"unknown class(es) {unknown}; this checkpoint has {class_names}")
    return sampler
