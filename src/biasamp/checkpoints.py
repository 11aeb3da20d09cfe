"""Reading biasamp training checkpoints without Lightning: safe loading, metadata, the EMA denoiser.

A checkpoint is a Lightning checkpoint with, in ``hyper_parameters``: the resolved training ``config``,
the dataset summary ``data``, ``label_dim``, ``img_resolution``, ``in_channels``, ``class_names``,
``bias_names`` and ``rho_data`` (effective); ``n_img`` at the top level; and the EMA weights in the state
dict under ``ema.module.``. Loading always uses ``torch.load(..., weights_only=True)``, so a shared
checkpoint cannot run code.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from biasamp.errors import UsageError
from biasamp.models import EDMPrecond, build_denoiser
from biasamp.models.build import build_mixed_denoiser
from biasamp.safe_load import load_weights_only

FORMAT_VERSION = 1
EMA_PREFIX = "ema.module."
REQUIRED_METADATA = ("config", "label_dim", "img_resolution", "in_channels", "class_names", "bias_names", "rho_data")


def configured_label_dropout(config: dict[str, Any]) -> float:
    """``model.net.label_dropout`` of a resolved training config (0 when unset)."""
    return float(((config.get("model") or {}).get("net") or {}).get("label_dropout", 0.0) or 0.0)


def checkpoint_metadata(config: dict[str, Any], identity: dict[str, Any], target_img: int, dataset: Any
                        ) -> dict[str, Any]:
    """The hyper-parameters a training run stores in every checkpoint (and in run.yaml): the resolved ``config``,
    the run's flat ``identity``, its ``target_img``, the ``label_dropout`` it trained with (0: no unconditional
    model), the dataset's ``summary()`` as ``data``, and what rebuilding the network and reading counts needs."""
    return {
        "config": config,
        "identity": identity,
        "target_img": int(target_img),
        "label_dropout": configured_label_dropout(config),
        "data": dataset.summary(),
        "label_dim": dataset.num_classes,
        "img_resolution": dataset.img_resolution,
        "in_channels": dataset.in_channels,
        "class_names": list(dataset.class_names),
        "bias_names": list(dataset.bias_names),
        "rho_data": float(dataset.rho_effective),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a biasamp checkpoint (weights only) onto the CPU.

    Raises UsageError, with one line, for a missing, corrupt or foreign file, and for one that holds pickled
    Python objects (code), which is refused and never loaded.
    """
    ckpt = load_weights_only(path, "checkpoint", "give a checkpoint written by biasamp.train (a .ckpt file, or a run "
                             "folder runs/train/<run>)", mmap=True)
    if not isinstance(ckpt, dict) or "biasamp_format" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a biasamp training checkpoint (no 'biasamp_format' entry)")
    missing = [k for k in REQUIRED_METADATA if k not in ckpt.get("hyper_parameters", {})]
    if missing:
        raise UsageError(f"checkpoint {path} lacks metadata {missing}; it cannot be used without its config")
    return ckpt


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The readable checkpoint with the most images seen in ``ckpt_dir`` (kept ones win ties with the
    snapshot). A file that cannot be read (truncated by a crash, corrupt) is skipped with a warning naming it,
    so it never blocks the good ones beside it."""
    ckpt_dir = Path(ckpt_dir)
    candidates = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file()) if ckpt_dir.is_dir() else []
    best: tuple[tuple[int, bool], Path] | None = None
    for path in candidates:
        try:
            n_img = int(load_checkpoint(path)["n_img"])
        except UsageError as err:
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        key = (n_img, path.name != "snapshot.ckpt")
        if best is None or key > best[0]:
            best = (key, path)
    return None if best is None else best[1]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the latest checkpoint of a run folder (``runs/train/<run>``) or of its
    ``checkpoints/`` folder. Paths that do not exist are returned unchanged (loading then says so)."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(folder)
        if found is None:
            raise UsageError(f"checkpoint={path}: a folder without readable checkpoints (*.ckpt)")
        return found
    return path


def target_img(config: dict[str, Any]) -> int:
    """Images a run must see to be finished: ``trainer.max_steps`` steps when set, else ``total_kimg``, in
    whole global batches of ``batch_size``."""
    batch = int(config["batch_size"])
    max_steps = (config.get("trainer") or {}).get("max_steps")
    if max_steps is None or max_steps == -1:
        max_steps = math.ceil(float(config["total_kimg"]) * 1000 / batch)
    return int(max_steps) * batch


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run's metadata: hyper-parameters plus ``n_img``, ``target_img``, ``finished`` (n_img reached the
    run's target) and ``label_dropout`` (the probability of training with the null label; 0: no
    unconditional model, so no guidance)."""
    hp = ckpt["hyper_parameters"]
    config = hp["config"]
    n_img = int(ckpt["n_img"])
    target = int(hp.get("target_img") or target_img(config))
    dropout = hp.get("label_dropout", configured_label_dropout(config))  # older checkpoints: from the config
    return {**hp, "n_img": n_img, "target_img": target, "finished": n_img >= target,
            "label_dropout": float(dropout or 0.0)}


def training_seed(meta: dict[str, Any]) -> int | None:
    """The ``seed`` the checkpoint's run was trained with (None for a config without one)."""
    seed = (meta.get("config") or {}).get("seed")
    return None if seed is None else int(seed)


def seed_free_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The run's identity without its seeds: ``seed`` and every ``<group>.seed`` (``dataset.seed``, which follows
    ``seed`` by default and seeds the data's resampling). Runs that differ only in their seeds share it: they
    are replicates of one training setting, and the report aggregates their counts over seeds."""
    ident = dict(meta.get("identity") or {})
    return {k: v for k, v in ident.items() if k != "seed" and not k.endswith(".seed")}


def ema_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA denoiser's weights (keys as in ``EDMPrecond.state_dict()``)."""
    state = {k[len(EMA_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(EMA_PREFIX)}
    if not state:
        raise UsageError("checkpoint holds no EMA weights (no 'ema.module.*' entries in its state dict)")
    return state


def load_denoiser(path: str | Path, use_ema: bool = True) -> tuple[EDMPrecond, dict[str, Any]]:
    """Rebuild the denoiser of a checkpoint from its own config and load its (EMA) weights. A checkpoint whose
    config has an ``invdiff`` entry (r, mix, delta_channels) holds InvDiff's mixed model: it is rebuilt as
    EDMPrecond(MixedNet(base, Delta)), so the count, report and oracle apps use it unchanged.

    ``path``: a checkpoint file, or a run folder (its latest checkpoint). Returns the denoiser in eval mode
    on the CPU and the checkpoint's metadata.
    """
    ckpt = load_checkpoint(resolve_checkpoint(path))
    meta = metadata(ckpt)
    shape = {"img_resolution": meta["img_resolution"], "in_channels": meta["in_channels"],
             "label_dim": meta["label_dim"]}
    mixed = meta["config"].get("invdiff")
    if mixed:  # InvDiff's frozen base + side network (models.mixed); both sets of weights are in the checkpoint
        denoiser = build_mixed_denoiser(meta["config"]["model"], **shape, r=mixed["r"], mix=mixed["mix"],
                                        delta_channels=mixed.get("delta_channels"))
    else:
        denoiser = build_denoiser(meta["config"]["model"], **shape)
    if use_ema:
        state = ema_state_dict(ckpt)
    else:
        prefix = "denoiser."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state, strict=True)
    return denoiser.eval().requires_grad_(False), meta


def load_finished(checkpoint: str | Path, allow_unfinished: bool = False) -> tuple[Path, dict[str, Any]]:
    """(the checkpoint file, its metadata) of a ``checkpoint`` setting (a file or a run folder); UsageError for a
    run that has not reached its target unless ``allow_unfinished``."""
    path = resolve_checkpoint(checkpoint).resolve()
    meta = metadata(load_checkpoint(path))
    if not meta["finished"] and not allow_unfinished:
        raise UsageError(f"checkpoint {path} is unfinished ({meta['n_img']} of {meta['target_img']} training "
                         "images); finish training it, or pass allow_unfinished=true")
    return path, meta
