"""Reading biasamp training checkpoints without Lightning: safe loading, metadata, the EMA denoiser.

A checkpoint is a Lightning checkpoint with, in ``hyper_parameters``: the resolved training ``config``,
the dataset summary ``data``, ``label_dim``, ``img_resolution``, ``in_channels``, ``class_names``,
``bias_names`` and ``rho_data`` (effective); ``n_img`` at the top level; and the EMA weights in the state
dict under ``ema.module.``. Loading always uses ``torch.load(..., weights_only=True)``, so a shared
checkpoint cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from biasamp.models import EDMPrecond, build_denoiser

FORMAT_VERSION = 1
EMA_PREFIX = "ema.module."
REQUIRED_METADATA = ("config", "label_dim", "img_resolution", "in_channels", "class_names", "bias_names", "rho_data")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a biasamp checkpoint (weights only) onto the CPU.

    Raises FileNotFoundError for a missing file and ValueError, with one line, for a corrupt or foreign one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} could not be read ({reason}); "
                         "it may be truncated or not a biasamp checkpoint") from err
    if not isinstance(ckpt, dict) or "biasamp_format" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a biasamp training checkpoint (no 'biasamp_format' entry)")
    missing = [k for k in REQUIRED_METADATA if k not in ckpt.get("hyper_parameters", {})]
    if missing:
        raise ValueError(f"checkpoint {path} lacks metadata {missing}; it cannot be used without its config")
    return ckpt


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint with the most images seen in ``ckpt_dir`` (kept ones win ties with the snapshot)."""
    ckpt_dir = Path(ckpt_dir)
    candidates = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file()) if ckpt_dir.is_dir() else []
    if not candidates:
        return None
    return max(candidates, key=lambda p: (int(load_checkpoint(p)["n_img"]), p.name != "snapshot.ckpt"))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the latest checkpoint of a run folder (``runs/train/<run>``) or of its
    ``checkpoints/`` folder. Paths that do not exist are returned unchanged (loading then says so)."""
    path = Path(path).expanduser()
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(folder)
        if found is None:
            raise FileNotFoundError(f"checkpoint={path}: a folder without checkpoints (*.ckpt)")
        return found
    return path


def metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The run's metadata: hyper-parameters plus ``n_img``."""
    return {**ckpt["hyper_parameters"], "n_img": int(ckpt["n_img"])}


def ema_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA denoiser's weights (keys as in ``EDMPrecond.state_dict()``)."""
    state = {k[len(EMA_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(EMA_PREFIX)}
    if not state:
        raise ValueError("checkpoint holds no EMA weights (no 'ema.module.*' entries in its state dict)")
    return state


def load_denoiser(path: str | Path, use_ema: bool = True) -> tuple[EDMPrecond, dict[str, Any]]:
    """Rebuild the denoiser of a checkpoint from its own config and load its (EMA) weights.

    ``path``: a checkpoint file, or a run folder (its latest checkpoint). Returns the denoiser in eval mode
    on the CPU and the checkpoint's metadata.
    """
    ckpt = load_checkpoint(resolve_checkpoint(path))
    meta = metadata(ckpt)
    denoiser = build_denoiser(
        meta["config"]["model"],
        img_resolution=meta["img_resolution"],
        in_channels=meta["in_channels"],
        label_dim=meta["label_dim"],
    )
    if use_ema:
        state = ema_state_dict(ckpt)
    else:
        prefix = "denoiser."
        state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    denoiser.load_state_dict(state, strict=True)
    return denoiser.eval().requires_grad_(False), meta
