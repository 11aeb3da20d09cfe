"""A trained classifier oracle: a ResNet-18 that predicts one attribute (the bias, or the class) of an image.

It is trained by ``python -m biasamp.oracle`` on a balanced resample of real labelled data and saved as
``oracle.ckpt``: plain tensors, lists and dicts only, so :meth:`ClassifierOracle.from_checkpoint` loads it
with ``torch.load(..., weights_only=True)``. The checkpoint also carries the oracle's confusion counts on
held-out real data (``{"<attribute>": {"labels": [...], "counts": [[...]], "per_class": {"<class>": [[...]]}}}``,
rows true, columns predicted; ``counts`` pooled over the classes, ``per_class`` the same counts split by the
held-out sample's class, for bias oracles), which the count app records in meta.json so the report can correct
rho_model for the oracle's errors.

This module is the one home of the file: :func:`save_oracle_checkpoint` writes it (atomically, fsynced) and
:func:`load_oracle_checkpoint` reads it. A missing, corrupt or foreign file, or one holding pickled code, is a
:class:`~biasamp.errors.UsageError` naming the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasamp.errors import UsageError, reason
from biasamp.oracles.base import OracleOutput
from biasamp.safe_load import load_weights_only

ARCHS = ("resnet18",)
ORACLE_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REQUIRED_KEYS = ("biasamp_oracle_format", "state_dict", "arch", "num_values", "value_names", "attribute",
                 "img_resolution", "confusion")


def pretrained_weights_path(arch: str) -> Path:
    """Where torchvision keeps its ImageNet weights for ``arch`` (the torch hub cache; never downloaded here)."""
    from torchvision.models import ResNet18_Weights

    if arch != "resnet18":
        raise UsageError(f"arch={arch!r} is not known; available: {list(ARCHS)}")
    filename = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def build_classifier(arch: str, num_values: int, pretrained: bool = False) -> nn.Module:
    """A torchvision classifier with ``num_values`` outputs; ``pretrained`` starts from local ImageNet weights."""
    from torchvision.models import resnet18

    if arch not in ARCHS:
        raise UsageError(f"arch={arch!r} is not known; available: {list(ARCHS)}")
    if not isinstance(num_values, int) or num_values < 2:
        raise ValueError(f"a classifier oracle needs at least 2 values to tell apart, got {num_values!r}")
    if not pretrained:
        return resnet18(weights=None, num_classes=num_values)
    path = pretrained_weights_path(arch)
    if not path.is_file():
        raise UsageError(f"pretrained=true needs torchvision's ImageNet {arch} weights at {path} "
                         "(they are not downloaded here); place the file there or use pretrained=false")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = resnet18(weights=None)
        model.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
        raise UsageError(f"pretrained {arch} weights at {path} could not be loaded ({reason(err)}); replace the "
                         "file with torchvision's, or use pretrained=false") from err
    model.fc = nn.Linear(model.fc.in_features, num_values)
    return model


def prepare_images(images: Tensor, resolution: int, imagenet_norm: bool) -> Tensor:
    """Float images in [-1, 1] (B, 3, H, W) -> the classifier's input: clamped, resized, normalised."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the classifier oracle needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(-1, 1)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=True)
    if imagenet_norm:
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std
    return x


def load_oracle_checkpoint(path: str | Path) -> dict[str, Any]:
    """An oracle.ckpt, loaded weights-only on the CPU. UsageError (one line naming the file) when it is missing,
    unreadable, holds pickled code (refused, never run), or is not a biasamp oracle checkpoint."""
    ckpt = load_weights_only(path, "oracle checkpoint", "use an oracle.ckpt written by python -m biasamp.oracle")
    if not isinstance(ckpt, dict) or "biasamp_oracle_format" not in ckpt:
        raise UsageError(f"{path} is not a biasamp oracle checkpoint (no 'biasamp_oracle_format' entry); use an "
                         "oracle.ckpt written by python -m biasamp.oracle")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"oracle checkpoint {path} lacks {missing}; train it again with python -m biasamp.oracle")
    return ckpt


def save_oracle_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` (plain tensors, lists, dicts) to ``path`` atomically: a temporary file in the same folder,
    flushed and fsynced, renamed over ``path``, then the folder fsynced (so the rename survives a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(ckpt, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; an oracle is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class ClassifierOracle:
    """One attribute of (B, 3, H, W) images in [-1, 1], predicted by a trained classifier.

    ``valid`` is False where the softmax confidence is below ``min_confidence`` (0: every sample is valid).
    """

    def __init__(self, model: nn.Module, attribute: str, value_names: list[str], img_resolution: int,
                 confusion: dict | None = None, imagenet_norm: bool = False, min_confidence: float = 0.0,
                 batch_size: int = 512) -> None:
        number = isinstance(min_confidence, int | float) and not isinstance(min_confidence, bool)
        if not number or not 0 <= min_confidence < 1:
            raise UsageError(f"oracle.min_confidence={min_confidence!r} is not allowed: a number in [0, 1)")
        self.model = model.eval()
        self.attributes = [str(attribute)]
        self.value_names = [[str(v) for v in value_names]]
        self.img_resolution = int(img_resolution)
        self.confusion = confusion
        self.imagenet_norm = bool(imagenet_norm)
        self.min_confidence = float(min_confidence)
        self.batch_size = int(batch_size)
        self.info: dict[str, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, min_confidence: float = 0.0) -> ClassifierOracle:
        ckpt = load_oracle_checkpoint(path)
        try:
            model = build_classifier(str(ckpt["arch"]), int(ckpt["num_values"]))
            model.load_state_dict(ckpt["state_dict"])
        except Exception as err:  # noqa: BLE001 - a foreign or damaged state dict raises many types
            raise UsageError(f"oracle checkpoint {path}: its weights do not fit its arch ({reason(err)}); train it "
                             "again with python -m biasamp.oracle") from err
        if len(ckpt["value_names"]) != int(ckpt["num_values"]):
            raise UsageError(f"oracle checkpoint {path}: {len(ckpt['value_names'])} value names for "
                             f"{ckpt['num_values']} outputs; train it again with python -m biasamp.oracle")
        oracle = cls(model, ckpt["attribute"], list(ckpt["value_names"]), int(ckpt["img_resolution"]),
                     confusion=ckpt["confusion"], imagenet_norm=bool(ckpt.get("imagenet_norm", False)),
                     min_confidence=min_confidence)
        oracle.info = {k: v for k, v in ckpt.items() if k != "state_dict"}
        return oracle

    def to(self, device: torch.device | str) -> ClassifierOracle:
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            x = prepare_images(images[start:start + self.batch_size].to(device), self.img_resolution,
                               self.imagenet_norm)
            out.append(self.model(x).float())
        return torch.cat(out) if out else torch.empty(0, len(self.value_names[0]), device=device)

    def __call__(self, images: Tensor) -> OracleOutput:
        was_training = self.model.training
        self.model.eval()
        probs = self.logits(images).softmax(dim=1).to(images.device)
        self.model.train(was_training)
        confidence, pred = probs.max(dim=1)
        valid = confidence >= self.min_confidence
        return OracleOutput(bias=pred.long().unsqueeze(1), confidence=confidence.unsqueeze(1), valid=valid)
