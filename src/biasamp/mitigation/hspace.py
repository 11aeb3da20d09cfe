"""Attribute heads in h-space for Balancing Act's distribution guidance: ``python -m biasamp.hspace``.

For one checkpoint and one sampler setting, :func:`train_heads`:

1. rebuilds the checkpoint's own training set (the rho-resampled data the model saw) with its bias labels (the
   ground-truth colour of Biased / Multi-Color MNIST, Waterbirds' place, BFFHQ's bias label);
2. holds out ``val_fraction`` of every (class, value) group and keeps at most ``max_per_group`` images of each
   group for training; training weighs every group equally (each image by 1 / its group's size), the expectation
   of a balanced resample, so a head cannot read the class instead of the attribute;
3. takes h (the ``dec["<r>x<r>_in1"]`` output, sampling.steering) of every image at every noise level the sampler
   evaluates (``sampling.evaluated_sigmas``: Heun's second evaluations and churned levels included), with the
   image's class label and no guidance: ``h_source=inversion`` walks each image up the sigma grid by the
   deterministic probability-flow ODE (Euler, x <- x + (sigma' - sigma) (x - D(x; sigma)) / sigma, starting from
   the clean image at the smallest sigma), as the released code's DDIM inversion; ``h_source=noised`` uses
   y + sigma n (n a fixed normal draw per image and level);
4. fits one linear head per level (multinomial logistic regression on standardised h, folded back into a linear
   map of raw h), and measures its held-out accuracy (mean over groups, and the worst group).

The result is one ``heads.pt`` (mitigation.heads), ``accuracy.csv`` and ``accuracy.png``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from biasamp.apps import set_cpu_threads
from biasamp.atomic import atomic_write_bytes, atomic_write_text
from biasamp.checkpoints import load_checkpoint, load_denoiser, metadata, resolve_checkpoint
from biasamp.counting.plan import sha256_file
from biasamp.data import build_dataset
from biasamp.data.stream import to_model_range
from biasamp.errors import UsageError
from biasamp.mitigation.heads import HEADS_NAME, HeadsFile
from biasamp.models import one_hot
from biasamp.sampling import IndexNoise, check_sampler_config, evaluated_sigmas, resolve_sampler_config
from biasamp.sampling.steering import HSpaceRecorder
from biasamp.speed import fast_denoiser, resolve_precision

H_SOURCES = ("inversion", "noised")
KEYS = ("checkpoint", "sampler", "attribute", "h_source", "val_fraction", "max_per_group", "steps", "lr",
        "weight_decay", "batch_size", "seed", "precision", "device", "threads", "name", "allow_unfinished")


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(options: Mapping[str, Any]) -> None:
    """Every setting that needs no file; UsageError (one line) otherwise."""
    unknown = sorted(set(options) - set(KEYS) - {"paths"})
    if unknown:
        raise UsageError(f"{unknown[0]} is not a setting of the hspace app (allowed: {', '.join(KEYS)})")
    if options.get("checkpoint") in (None, "", "???"):
        raise UsageError("checkpoint is required: python -m biasamp.hspace checkpoint=<ckpt file or run folder>")
    if options.get("h_source") not in H_SOURCES:
        raise UsageError(f"h_source={options.get('h_source')!r} is not allowed: use inversion (the deterministic ODE "
                         "inversion of each image, as the released code) or noised (y + sigma n)")
    vf = options.get("val_fraction")
    if not _real(vf) or not 0 < vf < 1:
        raise UsageError(f"val_fraction={vf!r} is not allowed: a share in (0, 1) of every (class, value) group")
    for key, low in (("max_per_group", 1), ("steps", 1), ("batch_size", 1), ("seed", 0)):
        if not _int(options.get(key)) or options[key] < low:
            raise UsageError(f"{key}={options.get(key)!r} is not allowed: an integer >= {low}")
    for key in ("lr", "weight_decay"):
        value = options.get(key)
        if not _real(value) or value < 0 or (key == "lr" and value == 0):
            raise UsageError(f"{key}={value!r} is not allowed: a finite number {'> 0' if key == 'lr' else '>= 0'}")
    if options.get("device") not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device={options.get('device')!r} is not allowed: use auto, cpu or cuda")
    if options.get("device") == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda is not allowed: this machine has no CUDA GPU; use device=auto or cpu")
    try:
        check_sampler_config(options.get("sampler"))
    except ValueError as err:
        raise UsageError(str(err)) from None
    resolve_precision("precision", options.get("precision"), "cpu")


def resolved_sampler(sampler: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler config with every parameter, null sigmas as the model's (refused outside its range)."""
    model = meta["config"].get("model") or {}
    lo, hi = float(model.get("sigma_min", 0.002)), float(model.get("sigma_max", 80.0))
    try:
        check_sampler_config(sampler, model_sigma_min=lo, model_sigma_max=hi)
    except ValueError as err:
        raise UsageError(str(err)) from None
    resolved = resolve_sampler_config(sampler)
    for key, default in (("sigma_min", lo), ("sigma_max", hi)):
        value = resolved[key]
        if value is not None and not lo <= value <= hi:
            raise UsageError(f"sampler.{key}={value!r} is not allowed: must lie in the model's sigma range "
                             f"[{lo:g}, {hi:g}], or be null (the model's value)")
        resolved[key] = float(default if value is None else value)
    return resolved


def bias_labels(dataset: Any, attribute: str | None) -> tuple[str, list[str], np.ndarray]:
    """(attribute, its value names, the bias value of every image) of one bias attribute of the dataset."""
    attributes = [str(a) for a in getattr(dataset, "bias_attributes", [])]
    biases = getattr(dataset, "biases", None)
    if not attributes or biases is None or len(biases) == 0:
        raise UsageError(f"dataset {getattr(dataset, 'name', '?')} has no bias labels: the heads need the bias "
                         "value of every training image; use a dataset with bias labels")
    name = attributes[0] if attribute is None else str(attribute)
    if name not in attributes:
        raise UsageError(f"attribute={attribute!r} is not allowed: the dataset's bias attributes are {attributes}")
    column = attributes.index(name)
    values = biases.numpy() if biases.ndim == 1 else biases[:, column].numpy()
    if values.min() < 0:
        raise UsageError(f"dataset {dataset.name} lacks the {name} label of some images: the heads need every "
                         "image's bias value")
    return name, [str(b) for b in dataset.bias_names], values.astype(np.int64)  # (attributes share one list)


def split_groups(groups: np.ndarray, val_fraction: float, max_per_group: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): ``floor(val_fraction n_g)`` (at least 1) random images of every
    group held out, at most ``max_per_group`` of the rest kept for training. UsageError for a group too small."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        n_val = max(1, int(math.floor(val_fraction * len(idx) + 1e-9)))
        if len(idx) - n_val < 1:
            raise UsageError(f"group {int(g)} of (class, value) has only {len(idx)} image(s): too few to hold some "
                             "out and train on the rest; use more data or a rho further from 1")
        held.append(idx[:n_val])
        train.append(idx[n_val:][:max_per_group])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


@torch.no_grad()
def extract_h(net: Any, images: torch.Tensor, labels: torch.Tensor, sigmas: Sequence[float], h_source: str,
              seed: int, batch_size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(position in ``sigmas``, h (N, D) float32 on the CPU) for every level, smallest sigma first.

    images (N, C, H, W) in [-1, 1], labels (N,) class indices; ``sigmas`` any order. Inversion carries every
    image's ODE state from one level to the next; noised draws n from IndexNoise(seed, image index)."""
    order = sorted(range(len(sigmas)), key=lambda k: sigmas[k])
    n = images.shape[0]
    state = images.clone()  # inversion: x at the current level (the clean image at the smallest)
    label_dim = int(net.label_dim)
    recorder = HSpaceRecorder()
    for step, k in enumerate(order):
        sigma = float(sigmas[k])
        parts = []
        for lo in range(0, n, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, n))
            if h_source == "inversion":
                x = state[idx].to(device)
            else:
                noise = IndexNoise(seed, idx.to(device), tuple(images.shape[1:]), device=device)
                x = images[idx].to(device) + sigma * noise(step)
            y = one_hot(labels[idx], label_dim).to(device)
            s = torch.full((len(idx),), sigma, dtype=torch.float32, device=device)
            recorder.h.clear()
            with recorder.attached(net):
                d = net(x, s, y)
            parts.append(recorder.h[-1].cpu())
            if h_source == "inversion" and step + 1 < len(order):
                nxt = float(sigmas[order[step + 1]])
                state[idx] = (x + (nxt - sigma) * (x - d) / sigma).cpu()  # Euler up the ODE: dx/dσ = (x − D)/σ
        yield k, torch.cat(parts)


def fit_head(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, num_values: int, steps: int, lr: float,
             weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted multinomial logistic regression of y (N,) on h (N, D): full-batch Adam from zeros on standardised
    features, returned as a linear map of raw h: (W (V, D), b (V,)) with logits = h W^T + b."""
    mean, std = h.mean(dim=0), h.std(dim=0).clamp_min(1e-6)
    z = (h - mean) / std
    w = torch.zeros(num_values, h.shape[1], requires_grad=True)
    b = torch.zeros(num_values, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    weight = weight / weight.sum()
    for _ in range(steps):
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(z @ w.T + b, y, reduction="none")
        loss = (weight * ce).sum() + weight_decay * (w**2).sum()
        loss.backward()
        opt.step()
    w_raw = (w / std).detach()  # logits = ((h − μ)/s) wᵀ + b = h (w/s)ᵀ + (b − (w/s) μ)
    return w_raw, (b - w_raw @ mean).detach()


def group_accuracy(logits: torch.Tensor, y: torch.Tensor, groups: np.ndarray) -> tuple[float, float]:
    """(mean over groups of the group's accuracy, the worst group's)."""
    right = (logits.argmax(dim=1) == y).numpy()
    accs = [float(right[groups == g].mean()) for g in np.unique(groups)]
    return float(np.mean(accs)), float(min(accs))


def _settings(cfg: DictConfig) -> dict[str, Any]:
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "paths"}


def train_heads(cfg: DictConfig, out_dir: Path) -> HeadsFile:
    """Check, rebuild the training data, extract h, fit and evaluate one head per level, write the files."""
    options = _settings(cfg)
    check_config(options)
    checkpoint = resolve_checkpoint(options["checkpoint"]).resolve()
    meta = metadata(load_checkpoint(checkpoint))
    if not meta["finished"] and not options.get("allow_unfinished"):
        raise UsageError(f"checkpoint {checkpoint} is unfinished ({meta['n_img']} of {meta['target_img']} training "
                         "images); finish training it, or pass allow_unfinished=true")
    sampler = resolved_sampler(options["sampler"], meta)
    sigmas = evaluated_sigmas(sampler, sampler["sigma_min"], sampler["sigma_max"])
    dataset = build_dataset(meta["config"]["dataset"])
    attribute, value_names, values = bias_labels(dataset, options.get("attribute"))
    labels = dataset.labels.numpy().astype(np.int64)
    class_names = [str(c) for c in dataset.class_names]
    num_values = len(value_names)
    device = torch.device("cuda" if options["device"] == "cuda" or options["device"] == "auto"
                          and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        set_cpu_threads(options["threads"], "threads")
    precision = resolve_precision("precision", options["precision"], device)
    start = time.perf_counter()

    groups = labels * num_values + values
    train_idx, held_idx = split_groups(groups, float(options["val_fraction"]), int(options["max_per_group"]),
                                       int(options["seed"]))
    sizes = np.bincount(groups[train_idx], minlength=len(class_names) * num_values).astype(np.float64)
    weight = torch.as_tensor(1.0 / sizes[groups[train_idx]], dtype=torch.float32)  # each group weighs the same
    use = np.concatenate([train_idx, held_idx])
    images = to_model_range(dataset.images[torch.as_tensor(use)])
    net_labels = torch.as_tensor(labels[use])
    y = torch.as_tensor(values[use])
    n_train = len(train_idx)

    denoiser, _ = load_denoiser(checkpoint)
    net = fast_denoiser(denoiser, device, precision=precision, channels_last=False, compile=False)
    weights = biases = None
    acc, worst, train_acc = [0.0] * len(sigmas), [0.0] * len(sigmas), [0.0] * len(sigmas)
    h_shape: list[int] = []
    for k, h in extract_h(net, images, net_labels, sigmas, options["h_source"], int(options["seed"]),
                          int(options["batch_size"]), device):
        if weights is None:
            weights = torch.zeros(len(sigmas), num_values, h.shape[1])
            biases = torch.zeros(len(sigmas), num_values)
        w, b = fit_head(h[:n_train], y[:n_train], weight, num_values, int(options["steps"]), float(options["lr"]),
                        float(options["weight_decay"]))
        weights[k], biases[k] = w, b
        train_acc[k] = group_accuracy(h[:n_train] @ w.T + b, y[:n_train], groups[train_idx])[0]
        acc[k], worst[k] = group_accuracy(h[n_train:] @ w.T + b, y[n_train:], groups[held_idx])
    with torch.no_grad():
        recorder = HSpaceRecorder()
        with recorder.attached(net):
            net(images[:1].to(device), torch.ones(1, device=device), one_hot(net_labels[:1], net.label_dim).to(device))
        h_shape = list(recorder.h_shapes[-1])

    counts = np.zeros((len(class_names), num_values))
    np.add.at(counts, (labels, values), 1)
    distribution = (counts / counts.sum(axis=1, keepdims=True).clip(min=1)).tolist()
    rho_per_class = [float(distribution[c][c]) if c < num_values else float("nan") for c in range(len(class_names))]
    settings = {**{k: v for k, v in options.items() if k not in ("sampler", "checkpoint")}, "sampler": sampler,
                "checkpoint": str(checkpoint), "precision": precision, "seconds": time.perf_counter() - start}
    heads = HeadsFile(weight=weights, bias=biases, sigmas=list(sigmas), attribute=attribute, value_names=value_names,
                      class_names=class_names, data_distribution=distribution, rho_per_class=rho_per_class,
                      accuracy=acc, worst_group_accuracy=worst, train_accuracy=train_acc,
                      checkpoint_sha256=sha256_file(checkpoint), h_shape=h_shape, n_train=n_train,
                      n_heldout=len(held_idx), settings=settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    heads.save(out_dir / HEADS_NAME)
    atomic_write_text(out_dir / "accuracy.csv", accuracy_csv(heads))
    plot_accuracy([heads], out_dir / "accuracy.png")
    return heads


def accuracy_csv(heads: HeadsFile) -> str:
    lines = ["sigma,accuracy,worst_group_accuracy,train_accuracy"]
    lines += [f"{s:.6g},{a:.4f},{w:.4f},{t:.4f}" for s, a, w, t in
              zip(heads.sigmas, heads.accuracy, heads.worst_group_accuracy, heads.train_accuracy, strict=True)]
    return "\n".join(lines) + "\n"


def accuracy_table(heads: HeadsFile) -> str:
    """The per-sigma held-out accuracies as a markdown table."""
    rows = ["| sigma | held-out accuracy | worst group | train |", "|---|---|---|---|"]
    rows += [f"| {s:.4g} | {a:.3f} | {w:.3f} | {t:.3f} |" for s, a, w, t in
             zip(heads.sigmas, heads.accuracy, heads.worst_group_accuracy, heads.train_accuracy, strict=True)]
    return "\n".join(rows)


def plot_accuracy(heads: Sequence[HeadsFile], path: Path, labels: Sequence[str] | None = None) -> None:
    """Held-out accuracy against sigma (log axis), one line per heads file, chance as a dashed line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for i, hf in enumerate(heads):
        label = labels[i] if labels else f"{hf.settings.get('h_source')} ({hf.attribute})"
        line, = ax.plot(hf.sigmas, hf.accuracy, marker="o", ms=3, label=label)
        ax.plot(hf.sigmas, hf.worst_group_accuracy, ls=":", color=line.get_color(), lw=1)
    ax.axhline(1.0 / len(heads[0].value_names), color="grey", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("held-out accuracy (dotted: worst group)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=150)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv: Sequence[str]) -> None:
    """``python -m biasamp.mitigation.hspace <out.png> <heads.pt> [<heads.pt> ...]``: their accuracy curves in
    one figure (labelled by each file's h source)."""
    if len(argv) < 2:
        raise SystemExit("usage: python -m biasamp.mitigation.hspace <out.png> <heads.pt> [<heads.pt> ...]")
    plot_accuracy([HeadsFile.load(p) for p in argv[1:]], Path(argv[0]))
    print(f"biasamp.mitigation.hspace: {argv[0]}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
