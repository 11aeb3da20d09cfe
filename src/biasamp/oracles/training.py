"""Training an oracle classifier (the library behind ``python -m biasamp.oracle``).

:func:`train_oracle` trains a classifier with a Lightning Trainer on a balanced resample of the real training
data: every (class, bias) group is first split into a held-out part (``val_fraction`` of it, never trained on)
and a training part; the training parts are then resampled (seeded, with replacement beyond a group's size) to
the size of the largest one, so the classifier cannot use the class as a shortcut for the bias, nor the bias
for the class. After training it measures, on the held-out data, the confusion counts, the accuracy of every
group, the overall accuracy and the accuracy under added Gaussian noise, and writes ``oracle.ckpt`` (loadable
with ``weights_only=True``; written atomically and fsynced) and ``metrics.json``.

The confusion is stored as ``{attribute: {"labels": [...], "counts": pooled, "per_class": {class: N_c}}}``
(rows true, columns predicted): ``counts`` pooled over the classes and, for attribute=bias, ``per_class`` the
same held-out samples split by their class, since an oracle's errors may depend on the class (BFFHQ: old women
are taken for men far more often than young women). attribute=target predicts the class itself: pooled only.

Every setting is checked by :func:`check_config` before any work (the dataset's files aside, which only its
builder can read); a bad one is a UsageError. A loss that becomes NaN or infinite stops training with
:class:`OracleTrainingDiverged`.
"""

from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from biasamp.apps import cpu_threads, set_cpu_threads
from biasamp.atomic import atomic_write_json
from biasamp.data import build_dataset, check_dataset_config
from biasamp.data.registry import config_classes_and_attributes
from biasamp.data.stream import to_model_range
from biasamp.errors import UsageError
from biasamp.identity import check_folder_name, safe_folder_part
from biasamp.oracles.classifier import (
    ARCHS,
    ORACLE_FORMAT,
    build_classifier,
    prepare_images,
    pretrained_weights_path,
    save_oracle_checkpoint,
)

ATTRIBUTES = ("bias", "target")
DEVICES = ("auto", "cpu", "cuda")
EVAL_BATCH = 512
CKPT_NAME = "oracle.ckpt"
TOP_KEYS = ("dataset", "paths", "attribute", "rho", "seed", "arch", "pretrained", "img_resolution", "batch_size",
            "max_epochs", "max_steps", "lr", "val_fraction", "noise_sigmas", "device", "threads", "name")

# ${biasamp_oracle_folder:${name}}: the output folder Hydra makes, harmless whatever name= holds (check_config
# then refuses a bad name, and the app removes the empty folder)
OmegaConf.register_new_resolver("biasamp_oracle_folder", safe_folder_part, replace=True)


class OracleTrainingDiverged(RuntimeError):
    """The classifier's training loss became NaN or infinite (not a usage error: the traceback is kept)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when available, else the CPU; cpu and cuda as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_config(cfg: DictConfig) -> None:
    """Check every setting of the app before any work, the dataset config included (its keys and rho values;
    its files are read only by its builder). Raises UsageError with one line naming the key."""
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{unknown[0]} is not a setting of the oracle app; allowed: {', '.join(TOP_KEYS)}")
    check_folder_name("name", cfg.name)
    if cfg.attribute not in ATTRIBUTES:
        raise UsageError(f"attribute={cfg.attribute!r} is not allowed: use bias (predict the bias value) "
                         "or target (predict the class)")
    if cfg.arch not in ARCHS:
        raise UsageError(f"arch={cfg.arch!r} is not known; available: {list(ARCHS)}")
    if not isinstance(cfg.pretrained, bool):
        raise UsageError(f"pretrained={cfg.pretrained!r} is not allowed: use true or false")
    if cfg.pretrained and not pretrained_weights_path(cfg.arch).is_file():
        raise UsageError(f"pretrained=true needs torchvision's ImageNet {cfg.arch} weights at "
                         f"{pretrained_weights_path(cfg.arch)} (they are not downloaded here); place the file "
                         "there or use pretrained=false")
    if cfg.img_resolution is not None and (not _is_int(cfg.img_resolution) or cfg.img_resolution < 8):
        raise UsageError(f"img_resolution={cfg.img_resolution!r} is not allowed: an integer >= 8, or null "
                         "(the dataset's)")
    for key in ("batch_size", "max_epochs"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise UsageError(f"{key}={cfg[key]!r} is not allowed: must be an integer >= 1")
    if cfg.max_steps is not None and (not _is_int(cfg.max_steps) or cfg.max_steps < 1):
        raise UsageError(f"max_steps={cfg.max_steps!r} is not allowed: an integer >= 1, or null "
                         "(max_epochs decides)")
    if not _is_real(cfg.lr) or not cfg.lr > 0:
        raise UsageError(f"lr={cfg.lr!r} is not allowed: must be a finite number > 0")
    if not _is_real(cfg.val_fraction) or not 0 < cfg.val_fraction < 1:
        raise UsageError(f"val_fraction={cfg.val_fraction!r} is not allowed: must be in (0, 1)")
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise UsageError(f"seed={cfg.seed!r} is not allowed: must be an integer >= 0")
    sigmas = _plain(cfg.noise_sigmas)
    if not isinstance(sigmas, list) or not all(_is_real(s) and s >= 0 for s in sigmas):
        raise UsageError(f"noise_sigmas={sigmas!r} is not allowed: a list of numbers >= 0 (may be empty)")
    if cfg.device not in DEVICES:
        raise UsageError(f"device={cfg.device!r} is not allowed: use auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda is not allowed here: no CUDA device is available; use device=auto or cpu")
    cpu_threads(cfg.threads, "threads")

    dataset = _plain(cfg.dataset)
    check_dataset_config(dataset)
    num_classes, bias_attributes = config_classes_and_attributes(dataset)
    if cfg.attribute == "bias" and len(bias_attributes) != 1:
        raise UsageError(f"attribute=bias is not allowed for dataset={dataset['name']}: it has "
                         f"{len(bias_attributes)} bias attributes {bias_attributes} and the oracle app learns one; "
                         "count its bias with oracle=colour (attribute=target trains its class classifier)")
    if num_classes < 2:
        raise UsageError(f"dataset={dataset['name']} with {num_classes} class is not allowed: an oracle tells at "
                         "least 2 values apart; use at least 2 classes (dataset.classes_to_use)")


# ------------------------------------------------------------------------------------------- data
def group_ids(labels: np.ndarray, biases: np.ndarray, num_biases: int) -> np.ndarray:
    """One id per (class, bias) group: class * num_biases + bias."""
    return np.asarray(labels, dtype=np.int64) * int(num_biases) + np.asarray(biases, dtype=np.int64)


def balanced_split(labels: Any, biases: Any, num_biases: int, val_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Held-out and balanced training indices.

    Every non-empty (class, bias) group gives ``floor(val_fraction * n_g)`` (at least 1) random samples to
    the held-out set; its other samples are resampled to the size ``m`` of the largest training part: all of
    them once, in random order, then random extras with replacement. So every group has exactly ``m``
    training samples and no held-out sample is ever trained on. Raises UsageError (one line) for a group too
    small to split (the dataset settings chose too little data for it).
    """
    rng = np.random.default_rng(int(seed))
    groups = group_ids(np.asarray(labels), np.asarray(biases), num_biases)
    members = {int(g): rng.permutation(np.flatnonzero(groups == g)) for g in np.unique(groups)}
    held, train_parts = [], {}
    for g, idx in members.items():
        n_val = max(1, int(math.floor(val_fraction * len(idx) + 1e-9)))
        if len(idx) - n_val < 1:
            c, b = divmod(g, num_biases)
            raise UsageError(f"the (class {c}, bias {b}) group has only {len(idx)} sample(s): too few to hold "
                             "some out and train on the rest; use more data (dataset.class_size) or a rho nearer "
                             "to 1/K")
        held.append(idx[:n_val])
        train_parts[g] = idx[n_val:]
    m = max(len(p) for p in train_parts.values())
    train = []
    for part in train_parts.values():
        extra = rng.choice(part, size=m - len(part), replace=True) if m > len(part) else part[:0]
        train.append(np.concatenate([part, extra]))
    train_idx = rng.permutation(np.concatenate(train))
    return train_idx, np.sort(np.concatenate(held))


class _ShuffledBatches:
    """Endless seeded epochs over ``indices``: (uint8 images, targets) batches (images are converted to float
    one batch at a time: a whole large dataset in float would not fit)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: np.ndarray, batch: int, seed: int):
        self.images, self.targets, self.batch, self.seed = images, targets, batch, seed
        self.indices = torch.as_tensor(indices)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            order = self.indices[torch.randperm(len(self.indices), generator=gen)]
            for i in range(0, len(order), self.batch):
                idx = order[i:i + self.batch]
                yield self.images[idx], self.targets[idx]


class AttributeClassifier(L.LightningModule):
    """Cross-entropy training of ``model`` on uint8 image batches (Adam)."""

    def __init__(self, model: torch.nn.Module, lr: float, resolution: int, imagenet_norm: bool) -> None:
        super().__init__()
        self.model, self.lr, self.resolution, self.imagenet_norm = model, lr, resolution, imagenet_norm
        self.last_loss = float("nan")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        x = prepare_images(to_model_range(images), self.resolution, self.imagenet_norm)
        loss = F.cross_entropy(self.model(x), targets)
        self.last_loss = float(loss.detach())
        if not math.isfinite(self.last_loss):
            raise OracleTrainingDiverged(f"the oracle's training loss became {self.last_loss} at step "
                                         f"{self.global_step + 1}; nothing was saved: try a lower lr")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, resolution: int, imagenet_norm: bool,
            device: torch.device, noise_sigma: float = 0.0, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Predicted value index for uint8 images, optionally with added Gaussian noise ([-1, 1] units, clamped)."""
    model.eval()
    out = []
    for start in range(0, len(images), EVAL_BATCH):
        x = to_model_range(images[start:start + EVAL_BATCH])
        if noise_sigma > 0:
            x = x + noise_sigma * torch.randn(x.shape, generator=generator)
        out.append(model(prepare_images(x.to(device), resolution, imagenet_norm)).argmax(dim=1).cpu())
    return torch.cat(out)


def confusion_counts(true: np.ndarray, pred: np.ndarray, num_values: int) -> np.ndarray:
    """N[i, j] = held-out samples of true value i predicted as j."""
    counts = np.zeros((num_values, num_values), dtype=np.int64)
    np.add.at(counts, (np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return counts


def per_class_confusion(classes: np.ndarray, true: np.ndarray, pred: np.ndarray, class_names: list[str],
                        num_values: int) -> dict[str, list[list[int]]]:
    """{class name: N_c} with N_c[i, j] = held-out samples of that class with true value i predicted as j (their
    sum is the pooled confusion). A class with no held-out sample of some true value has a row of zeros there:
    its own confusion is unknown for that value, and the report then refuses confusion=per_class and falls back
    to the pooled matrix under confusion=auto, saying so (biasamp.analysis.correction.select_confusion)."""
    classes = np.asarray(classes)
    return {name: confusion_counts(true[classes == c], pred[classes == c], num_values).tolist()
            for c, name in enumerate(class_names)}


# ------------------------------------------------------------------------------------------- the app
def training_targets(cfg: DictConfig, dataset: Any) -> tuple[str, list[str], np.ndarray, np.ndarray]:
    """(attribute name, value names, targets (N,), the bias values (N,) the groups are balanced on).

    For a dataset with several bias attributes (attribute=target only, as check_config ensures) the groups are
    those of the first attribute. Raises UsageError when a value has no sample (it could not be learned)."""
    biases = dataset.biases.numpy()
    if biases.ndim != 1:
        biases = biases[:, 0]
    if cfg.attribute == "bias":
        attribute, value_names, targets = dataset.bias_attributes[0], [str(b) for b in dataset.bias_names], biases
    else:
        attribute, value_names, targets = "class", [str(c) for c in dataset.class_names], dataset.labels.numpy()
    missing = sorted(set(range(len(value_names))) - {int(t) for t in np.unique(targets)})
    if missing:
        raise UsageError(f"attribute={cfg.attribute}: value(s) {[value_names[i] for i in missing]} have no sample "
                         f"in dataset={cfg.dataset.name}; the oracle could not learn them: change rho or the "
                         "dataset settings")
    return attribute, value_names, targets, biases


def train_oracle(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Check, build the data, train, evaluate, save; returns the saved metrics (without the weights)."""
    # Check every setting, then build the data (its builder checks the files)
    check_config(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        set_cpu_threads(cfg.threads, "threads")
    dataset = build_dataset(cfg.dataset)
    class_names = [str(c) for c in dataset.class_names]
    bias_names = [str(b) for b in dataset.bias_names]
    labels = dataset.labels.numpy()
    attribute, value_names, targets, biases = training_targets(cfg, dataset)
    num_values = len(value_names)
    resolution = int(cfg.img_resolution or dataset.images.shape[-1])
    imagenet_norm = bool(cfg.pretrained)
    train_idx, val_idx = balanced_split(labels, biases, len(bias_names), float(cfg.val_fraction), int(cfg.seed))

    # Train on the balanced resample
    torch.manual_seed(int(cfg.seed))
    model = build_classifier(str(cfg.arch), num_values, pretrained=bool(cfg.pretrained)).to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = dataset.images  # uint8 (N, 3, H, W); prepare_images resizes each batch to ``resolution``
    y = torch.as_tensor(targets, dtype=torch.long)
    batch = int(cfg.batch_size)
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    max_steps = int(cfg.max_steps) if cfg.max_steps is not None else int(cfg.max_epochs) * steps_per_epoch
    module = AttributeClassifier(model, float(cfg.lr), resolution, imagenet_norm)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=max_steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(out_dir))
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=_ShuffledBatches(images, y, train_idx, batch, int(cfg.seed)))
    step, loss = int(trainer.global_step), module.last_loss
    model = module.model.to(device)
    train_s = time.perf_counter() - start

    # Evaluate on the held-out part of every group, clean and under noise
    val = torch.as_tensor(val_idx)
    true = y[val].numpy()
    pred = predict(model, images[val], resolution, imagenet_norm, device).numpy()
    counts = confusion_counts(true, pred, num_values)
    confusion = {"labels": list(value_names), "counts": counts.tolist()}
    if cfg.attribute == "bias":
        confusion["per_class"] = per_class_confusion(labels[val_idx], true, pred, class_names, num_values)
    correct = pred == true
    accuracy = float(correct.mean())
    groups = []
    for c, cname in enumerate(class_names):
        for b, bname in enumerate(bias_names):
            sel = (labels[val_idx] == c) & (biases[val_idx] == b)
            if sel.any():
                groups.append({"class": cname, "bias": bname, "n": int(sel.sum()),
                               "accuracy": float(correct[sel].mean())})
    worst = min(g["accuracy"] for g in groups)
    noise_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
    noise = [{"sigma": float(s), "accuracy": float((predict(model, images[val], resolution, imagenet_norm, device,
                                                             float(s), noise_gen).numpy() == true).mean())}
             for s in cfg.noise_sigmas]
    train_groups = np.unique(group_ids(labels[train_idx], biases[train_idx], len(bias_names)), return_counts=True)

    # Save: oracle.ckpt (weights + metrics), then metrics.json
    metrics = {
        "biasamp_oracle_format": ORACLE_FORMAT,
        "arch": str(cfg.arch),
        "pretrained": bool(cfg.pretrained),
        "imagenet_norm": imagenet_norm,
        "num_values": num_values,
        "value_names": list(value_names),
        "attribute": attribute,
        "target": str(cfg.attribute),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "class_names": class_names,
        "bias_names": bias_names,
        "img_resolution": resolution,
        "confusion": {attribute: confusion},
        "accuracy": accuracy,
        "worst_group_accuracy": worst,
        "group_accuracy": groups,
        "noise_accuracy": noise,
        "n_heldout": len(val_idx),
        "n_train": len(train_idx),
        "n_train_per_group": int(train_groups[1][0]),
        "steps": step,
        "final_loss": loss,
        "train_seconds": train_s,
        "seed": int(cfg.seed),
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_oracle_checkpoint(out_dir / CKPT_NAME, {**metrics, "state_dict": state})
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
