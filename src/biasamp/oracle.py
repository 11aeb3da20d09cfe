"""Oracle training app: ``python -m biasamp.oracle dataset=<name> attribute=bias|target [rho=...]``.

Trains a classifier oracle with a Lightning Trainer (conf/oracle_train.yaml describes every option) on a
balanced resample of the real training data: every (class, bias) group is first split into a held-out part
(``val_fraction`` of it, never trained on) and a training part; the training parts are then resampled
(seeded, with replacement beyond a group's size) to the size of the largest one, so the classifier cannot
use the class as a shortcut for the bias, nor the bias for the class. After training it measures, on the
held-out data, the confusion counts, the accuracy of every group, the overall accuracy and the accuracy
under added Gaussian noise, and writes ``oracle.ckpt`` (loadable with ``weights_only=True``) and
``metrics.json``. Every value is checked before any work; a bad one stops the app with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biasamp.atomic import atomic_write_json
from biasamp.data import build_dataset
from biasamp.data.stream import to_model_range
from biasamp.oracles.classifier import ARCHS, ORACLE_FORMAT, build_classifier, prepare_images

ATTRIBUTES = ("bias", "target")
DEVICES = ("auto", "cpu", "cuda")
EVAL_BATCH = 512


class OracleConfigError(ValueError):
    """An oracle-training setting that cannot work; the message is one line."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_config(cfg: DictConfig) -> None:
    """Check every option of the app (not the dataset's, which its builder checks)."""
    if cfg.attribute not in ATTRIBUTES:
        raise OracleConfigError(f"attribute={cfg.attribute!r} is not allowed: use bias (predict the bias value) "
                                "or target (predict the class)")
    if cfg.arch not in ARCHS:
        raise OracleConfigError(f"arch={cfg.arch!r} is not known; available: {list(ARCHS)}")
    if not isinstance(cfg.pretrained, bool):
        raise OracleConfigError(f"pretrained={cfg.pretrained!r} is not allowed: use true or false")
    if cfg.img_resolution is not None and (not _is_int(cfg.img_resolution) or cfg.img_resolution < 8):
        raise OracleConfigError(f"img_resolution={cfg.img_resolution!r} is not allowed: an integer >= 8, or null "
                                "(the dataset's)")
    for key in ("batch_size", "max_epochs"):
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise OracleConfigError(f"{key}={cfg[key]!r} is not allowed: must be an integer >= 1")
    if cfg.max_steps is not None and (not _is_int(cfg.max_steps) or cfg.max_steps < 1):
        raise OracleConfigError(f"max_steps={cfg.max_steps!r} is not allowed: an integer >= 1, or null "
                                "(max_epochs decides)")
    if not _is_real(cfg.lr) or not cfg.lr > 0:
        raise OracleConfigError(f"lr={cfg.lr!r} is not allowed: must be a number > 0")
    if not _is_real(cfg.val_fraction) or not 0 < cfg.val_fraction < 1:
        raise OracleConfigError(f"val_fraction={cfg.val_fraction!r} is not allowed: must be in (0, 1)")
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise OracleConfigError(f"seed={cfg.seed!r} is not allowed: must be an integer >= 0")
    sigmas = OmegaConf.to_container(cfg.noise_sigmas) if OmegaConf.is_config(cfg.noise_sigmas) else cfg.noise_sigmas
    if not isinstance(sigmas, list) or not all(_is_real(s) and s >= 0 for s in sigmas):
        raise OracleConfigError(f"noise_sigmas={sigmas!r} is not allowed: a list of numbers >= 0 (may be empty)")
    if cfg.device not in DEVICES:
        raise OracleConfigError(f"device={cfg.device!r} is not allowed: use auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise OracleConfigError("device=cuda but no CUDA device is available; use device=auto or cpu")


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
    training samples and no held-out sample is ever trained on. Raises ValueError (one line) for a group too
    small to split.
    """
    rng = np.random.default_rng(int(seed))
    groups = group_ids(np.asarray(labels), np.asarray(biases), num_biases)
    members = {int(g): rng.permutation(np.flatnonzero(groups == g)) for g in np.unique(groups)}
    held, train_parts = [], {}
    for g, idx in members.items():
        n_val = max(1, int(math.floor(val_fraction * len(idx) + 1e-9)))
        if len(idx) - n_val < 1:
            c, b = divmod(g, num_biases)
            raise ValueError(f"the (class {c}, bias {b}) group has only {len(idx)} sample(s): too few to hold "
                             "some out and train on the rest; use more data or a rho nearer to 1/K")
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
            raise OracleConfigError(f"the training loss became {self.last_loss} at step {self.global_step + 1}; "
                                    "lower lr")
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


# ------------------------------------------------------------------------------------------- the app
def train_oracle(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Check, build the data, train, evaluate, save; returns the saved metrics (without the weights)."""
    check_config(cfg)
    dataset = build_dataset(cfg.dataset)
    for key in ("images", "labels", "biases", "class_names", "bias_names"):
        if not hasattr(dataset, key):
            raise OracleConfigError(f"dataset={cfg.dataset.name!r} has no in-memory {key!r}; the oracle app needs "
                                    "images, labels, biases, class_names and bias_names")
    class_names = [str(c) for c in dataset.class_names]
    bias_names = [str(b) for b in dataset.bias_names]
    labels, biases = dataset.labels.numpy(), dataset.biases.numpy()
    attributes = list(getattr(dataset, "bias_attributes", None) or ["bias"])
    if biases.ndim != 1:
        if cfg.attribute == "bias":
            raise OracleConfigError(f"dataset={cfg.dataset.name!r} has {len(attributes)} bias attributes "
                                    f"{attributes}; the oracle app learns one: count its bias with oracle=colour "
                                    "(attribute=target trains its class classifier)")
        biases = biases[:, 0]  # a class classifier: balance the groups of the first bias attribute
    if cfg.attribute == "bias":
        attribute = attributes[0]
        value_names, targets = bias_names, biases
    else:
        attribute, value_names, targets = "class", class_names, labels
    num_values = len(value_names)
    if num_values < 2:
        raise OracleConfigError(f"attribute={cfg.attribute}: the dataset has only {value_names} — nothing to "
                                "tell apart; use at least 2 classes")
    missing = sorted(set(range(num_values)) - {int(t) for t in np.unique(targets)})
    if missing:
        raise OracleConfigError(f"attribute={cfg.attribute}: value(s) {[value_names[i] for i in missing]} have no "
                                "sample in this dataset; the oracle could not learn them")
    resolution = int(cfg.img_resolution or dataset.images.shape[-1])
    imagenet_norm = bool(cfg.pretrained)
    train_idx, val_idx = balanced_split(labels, biases, len(bias_names), float(cfg.val_fraction), int(cfg.seed))

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
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

    val = torch.as_tensor(val_idx)
    true = y[val].numpy()
    pred = predict(model, images[val], resolution, imagenet_norm, device).numpy()
    counts = confusion_counts(true, pred, num_values)
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
        "confusion": {attribute: {"labels": list(value_names), "counts": counts.tolist()}},
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
    tmp = out_dir / "oracle.ckpt.tmp"
    torch.save({**metrics, "state_dict": state}, tmp)
    tmp.replace(out_dir / "oracle.ckpt")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        metrics = train_oracle(cfg, out_dir)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError) as err:
        print(f"biasamp.oracle: error: {err}", file=sys.stderr)
        sys.exit(2)
    last = metrics["noise_accuracy"][-1] if metrics["noise_accuracy"] else None
    noise = f", accuracy at noise {last['sigma']:g}={last['accuracy']:.4f}" if last else ""
    print(f"biasamp.oracle: {metrics['attribute']} oracle: held-out accuracy={metrics['accuracy']:.4f} "
          f"(n={metrics['n_heldout']}), worst-group accuracy={metrics['worst_group_accuracy']:.4f}{noise}; "
          f"checkpoint {out_dir / 'oracle.ckpt'}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="oracle_train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
