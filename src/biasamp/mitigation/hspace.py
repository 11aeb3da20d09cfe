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

``h_source=trajectory`` takes h instead along the model's own sampling trajectories (the sampler setting, at
guidance ``trajectory.guidance``; noise streams disjoint from the count app's), labelled by the oracle's verdict on
each final image (the paper's "pseudo labels"; invalid samples dropped), grouped by (conditioning class, oracle
value) and balanced the same way. Its heads also store each class's log share of each value among those samples
(``class_log_prior``): steering adds it to a class's logits, so that at temperature 1 the block mean of p
estimates the share of each value that the block's final images will have, the quantity a non-uniform target
(``steer.target=data``) is compared with. Heads fitted on a balanced resample put the minority value's share near
1/V wherever h does not yet decide the value, which pushes every block toward the majority value.

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
from omegaconf import DictConfig

from biasamp.apps import app_device, app_options, check_device, set_cpu_threads
from biasamp.atomic import atomic_write_bytes, atomic_write_text
from biasamp.checkpoints import load_denoiser, load_finished
from biasamp.counting.job import row_seed
from biasamp.counting.plan import sha256_file
from biasamp.data import build_dataset
from biasamp.data.stream import to_model_range
from biasamp.errors import UsageError
from biasamp.mitigation.heads import HEADS_NAME, HeadsFile
from biasamp.models import one_hot
from biasamp.oracles import Oracle, build_oracle
from biasamp.sampling import (
    UNCOND_MODES,
    IndexNoise,
    check_sampler_config,
    evaluated_sigmas,
    guided_denoiser,
    resolve_sampler_config,
    sample,
)
from biasamp.sampling.steering import HSpaceRecorder, hooked, matching_head
from biasamp.speed import fast_denoiser, resolve_precision

H_SOURCES = ("inversion", "noised", "trajectory")
KEYS = ("checkpoint", "sampler", "attribute", "h_source", "val_fraction", "max_per_group", "steps", "lr",
        "weight_decay", "batch_size", "seed", "precision", "device", "threads", "name", "allow_unfinished",
        "oracle", "trajectory")
TRAJECTORY_KEYS = ("n_per_class", "guidance", "guidance_uncond")
TRAJECTORY_OFFSET = 1_000_000_000  # trajectory sample i uses noise index OFFSET + i: disjoint from any count


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
                         "inversion of each image, as the released code), noised (y + sigma n) or trajectory (the "
                         "model's own samples, labelled by the oracle)")
    traj = options.get("trajectory") or {}
    extra = sorted(set(traj) - set(TRAJECTORY_KEYS))
    if extra:
        raise UsageError(f"trajectory.{extra[0]} is not a setting (allowed: {', '.join(TRAJECTORY_KEYS)})")
    if options.get("h_source") == "trajectory":
        n = traj.get("n_per_class")
        if not _int(n) or n < 2:
            raise UsageError(f"trajectory.n_per_class={n!r} is not allowed: an integer >= 2 (samples per class)")
        w = traj.get("guidance")
        if not _real(w) or w < 0:
            raise UsageError(f"trajectory.guidance={w!r} is not allowed: a finite number >= 0 (the count's w)")
        if traj.get("guidance_uncond") not in UNCOND_MODES:
            raise UsageError(f"trajectory.guidance_uncond={traj.get('guidance_uncond')!r} is not allowed: one of "
                             f"{', '.join(UNCOND_MODES)}")
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
    check_device(options.get("device"))
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


def bias_labels(dataset: Any, attribute: str | None, need: str = "the heads") -> tuple[str, list[str], np.ndarray]:
    """(attribute, its value names, the bias value of every image) of one bias attribute of the dataset; ``need``:
    what needs them, for the refusal's message."""
    attributes = [str(a) for a in getattr(dataset, "bias_attributes", [])]
    biases = getattr(dataset, "biases", None)
    if not attributes or biases is None or len(biases) == 0:
        raise UsageError(f"dataset {getattr(dataset, 'name', '?')} has no bias labels: {need} need the bias "
                         "value of every training image; use a dataset with bias labels")
    name = attributes[0] if attribute is None else str(attribute)
    if name not in attributes:
        raise UsageError(f"attribute={attribute!r} is not allowed: the dataset's bias attributes are {attributes}")
    column = attributes.index(name)
    values = biases.numpy() if biases.ndim == 1 else biases[:, column].numpy()
    if values.min() < 0:
        raise UsageError(f"dataset {dataset.name} lacks the {name} label of some images: {need} need every "
                         "image's bias value")
    return name, [str(b) for b in dataset.bias_names], values.astype(np.int64)  # (attributes share one list)


def split_groups(groups: np.ndarray, val_fraction: float, max_per_group: int, seed: int,
                 hint: str = "use more data or a rho further from 1") -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices): ``floor(val_fraction n_g)`` (at least 1) random images of every
    group held out, at most ``max_per_group`` of the rest kept for training. UsageError for a group too small."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for g in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == g))
        n_val = max(1, int(math.floor(val_fraction * len(idx) + 1e-9)))
        if len(idx) - n_val < 1:
            raise UsageError(f"group {int(g)} of (class, value) has only {len(idx)} image(s): too few to hold some "
                             f"out and train on the rest; {hint}")
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


@torch.no_grad()
def trajectory_h(net: Any, sampler: Mapping[str, Any], sigmas: Sequence[float], classes: Sequence[int],
                 n_per_class: int, guidance: float, uncond: str, seed: int, batch_size: int,
                 image_shape: tuple[int, ...], device: torch.device, oracle: Oracle, column: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, np.ndarray, np.ndarray]:
    """h along the model's own unsteered sampling trajectories, and the oracle's verdict on the final images.

    Sample i of class c starts from IndexNoise(row_seed(seed, c), TRAJECTORY_OFFSET + i). Returns, per level of
    ``sigmas``: h (R_k, D) float32 of the cond rows of every evaluation at that level (Heun evaluates some levels
    twice: R_k = 2 N there), and the sample id (R_k,) of each row; per sample (N = len(classes) n_per_class, ids
    0..N-1): its class, the oracle's value of attribute ``column``, and whether the oracle finds it valid."""
    grid = torch.tensor([float(x) for x in sigmas], dtype=torch.float64)
    rows_h: list[list[torch.Tensor]] = [[] for _ in sigmas]
    rows_id: list[list[torch.Tensor]] = [[] for _ in sigmas]
    current: dict[str, Any] = {}

    def hook(module: Any, inputs: tuple, output: torch.Tensor) -> None:
        k = current.get("head")
        if k is not None:
            n = len(current["ids"])  # the cond rows come first (sampling.guidance)
            rows_h[k].append(output[:n].reshape(n, -1).to(torch.float32).cpu())
            rows_id[k].append(current["ids"])

    sample_class, sample_value, sample_valid = [], [], []
    first = 0
    for c in classes:
        for lo in range(0, n_per_class, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, n_per_class))
            ids = torch.arange(first + lo, first + lo + len(idx))
            labels = one_hot(torch.full((len(idx),), int(c), dtype=torch.long), int(net.label_dim)).to(device)
            denoiser = guided_denoiser(net, labels, guidance=guidance, uncond=uncond, interval=None,
                                       label_dim=int(net.label_dim))
            noise = IndexNoise(row_seed(seed, int(c)), (idx + TRAJECTORY_OFFSET).to(device), tuple(image_shape),
                               device=device)

            def recording(x: torch.Tensor, sigma: torch.Tensor, denoiser: Any = denoiser, ids: Any = ids
                          ) -> torch.Tensor:
                s = float(torch.as_tensor(sigma).reshape(-1)[0])
                k = matching_head(grid, s)
                if k is None:
                    raise RuntimeError(f"the sampler evaluated sigma={s!r}, not in its evaluated_sigmas")
                current.update(head=k, ids=ids)
                try:
                    return denoiser(x, sigma)
                finally:
                    current["head"] = None

            with hooked(net, hook):
                x = sample(recording, noise, sampler, sigma_min=net.sigma_min, sigma_max=net.sigma_max)
            out = oracle(x.clamp(-1.0, 1.0))
            sample_class.append(np.full(len(idx), int(c)))
            sample_value.append(out.bias[:, column].cpu().numpy())
            sample_valid.append(out.valid.cpu().numpy())
        first += n_per_class
    missing = [float(grid[k]) for k in range(len(sigmas)) if not rows_h[k]]
    if missing:
        raise RuntimeError(f"the sampler never evaluated sigma={missing[0]!r} of its evaluated_sigmas")
    return ([torch.cat(r) for r in rows_h], [torch.cat(r) for r in rows_id], np.concatenate(sample_class),
            np.concatenate(sample_value).astype(np.int64), np.concatenate(sample_valid).astype(bool))


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


def _levels_real(net: Any, dataset: Any, labels: np.ndarray, values: np.ndarray, num_values: int,
                 sigmas: Sequence[float], options: Mapping[str, Any], device: torch.device
                 ) -> tuple[Iterator[tuple[int, torch.Tensor, torch.Tensor]], np.ndarray, np.ndarray, np.ndarray,
                            np.ndarray]:
    """The training images' h per level (inversion | noised): (iterator of (level, h, sample id of each row),
    per-sample groups, values, training mask, held-out mask); the samples are the training split's images, then
    the held-out split's."""
    groups = labels * num_values + values
    train_idx, held_idx = split_groups(groups, float(options["val_fraction"]), int(options["max_per_group"]),
                                       int(options["seed"]))
    use = np.concatenate([train_idx, held_idx])
    images = to_model_range(dataset.images[torch.as_tensor(use)])
    ids = torch.arange(len(use))
    levels = ((k, h, ids) for k, h in extract_h(net, images, torch.as_tensor(labels[use]), sigmas,
                                                options["h_source"], int(options["seed"]),
                                                int(options["batch_size"]), device))
    train = np.zeros(len(use), dtype=bool)
    train[:len(train_idx)] = True
    return levels, groups[use], values[use], train, ~train


def _levels_trajectory(net: Any, sampler: Mapping[str, Any], meta: Mapping[str, Any], num_classes: int,
                       value_names: Sequence[str], attribute: str, sigmas: Sequence[float],
                       options: Mapping[str, Any], image_shape: tuple[int, ...], device: torch.device
                       ) -> tuple[Iterator[tuple[int, torch.Tensor, torch.Tensor]], np.ndarray, np.ndarray,
                                  np.ndarray, np.ndarray, dict[str, Any]]:
    """The model's own samples' h per level, labelled by the oracle (h_source=trajectory); as _levels_real, plus
    what the samples were: per-class value counts, invalid samples, the class log prior."""
    oracle = build_oracle(options["oracle"], meta)
    if attribute not in oracle.attributes:
        raise UsageError(f"attribute={attribute!r} is not predicted by oracle={options['oracle'].get('name')} "
                         f"(it predicts {oracle.attributes}); use an oracle of that attribute")
    column = oracle.attributes.index(attribute)
    if [str(v) for v in oracle.value_names[column]] != list(value_names):
        raise UsageError(f"oracle={options['oracle'].get('name')} predicts values {oracle.value_names[column]} of "
                         f"{attribute}, the dataset has {list(value_names)}; use an oracle with the same values")
    traj = options["trajectory"]
    h_levels, id_levels, classes, values, valid = trajectory_h(
        net, sampler, sigmas, range(num_classes), int(traj["n_per_class"]), float(traj["guidance"]),
        str(traj["guidance_uncond"]), int(options["seed"]), int(options["batch_size"]), image_shape, device,
        oracle.to(device), column)
    num_values = len(value_names)
    counts = np.zeros((num_classes, num_values), dtype=np.int64)
    np.add.at(counts, (classes[valid], values[valid]), 1)
    keep = np.flatnonzero(valid)
    groups = classes * num_values + values
    train_keep, held_keep = split_groups(groups[keep], float(options["val_fraction"]), int(options["max_per_group"]),
                                         int(options["seed"]), hint="raise trajectory.n_per_class (the model "
                                         "rarely makes this value for this class)")
    train = np.zeros(len(groups), dtype=bool)
    train[keep[train_keep]] = True
    held = np.zeros(len(groups), dtype=bool)
    held[keep[held_keep]] = True
    used = train | held
    # a class's own prior, smoothed by half a sample per value (a value never seen keeps a finite log share)
    prior = (counts + 0.5) / (counts.sum(axis=1, keepdims=True) + 0.5 * num_values)
    info = {"sample_counts": counts.tolist(), "invalid": int((~valid).sum()), "n_samples": int(len(valid)),
            "class_log_prior": np.log(prior).tolist()}

    def levels() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for k in range(len(sigmas)):
            rows = torch.as_tensor(used[id_levels[k].numpy()])
            yield k, h_levels[k][rows], id_levels[k][rows]

    return levels(), groups, values, train, held, info


def train_heads(cfg: DictConfig, out_dir: Path) -> HeadsFile:
    """Check, gather h (training images, or the model's own samples), fit and evaluate one head per level, write
    the files."""
    options = app_options(cfg)
    check_config(options)
    checkpoint, meta = load_finished(options["checkpoint"], bool(options.get("allow_unfinished")))
    sampler = resolved_sampler(options["sampler"], meta)
    sigmas = evaluated_sigmas(sampler, sampler["sigma_min"], sampler["sigma_max"])
    dataset = build_dataset(meta["config"]["dataset"])
    attribute, value_names, values = bias_labels(dataset, options.get("attribute"))
    labels = dataset.labels.numpy().astype(np.int64)
    class_names = [str(c) for c in dataset.class_names]
    num_values = len(value_names)
    device = app_device(options["device"])
    if device.type == "cpu":
        set_cpu_threads(options["threads"], "threads")
    precision = resolve_precision("precision", options["precision"], device)
    start = time.perf_counter()

    denoiser, _ = load_denoiser(checkpoint)
    net = fast_denoiser(denoiser, device, precision=precision, channels_last=False, compile=False)
    image_shape = tuple(int(x) for x in dataset.images.shape[1:])
    info: dict[str, Any] = {}
    if options["h_source"] == "trajectory":
        levels, groups, y_all, train, held, info = _levels_trajectory(net, sampler, meta, len(class_names), value_names,
                                                                attribute, sigmas, options, image_shape, device)
    else:
        levels, groups, y_all, train, held = _levels_real(net, dataset, labels, values, num_values, sigmas, options,
                                                    device)
    sizes = np.bincount(groups[train], minlength=len(class_names) * num_values).astype(np.float64)
    weights = biases = None
    acc, worst, train_acc = [0.0] * len(sigmas), [0.0] * len(sigmas), [0.0] * len(sigmas)
    for k, h, ids in levels:
        ids_np = ids.numpy()
        fit, out = torch.as_tensor(train[ids_np]), torch.as_tensor(held[ids_np])
        y, g = torch.as_tensor(y_all[ids_np]), groups[ids_np]
        if weights is None:
            weights = torch.zeros(len(sigmas), num_values, h.shape[1])
            biases = torch.zeros(len(sigmas), num_values)
        weight = torch.as_tensor(1.0 / sizes[g[fit.numpy()]], dtype=torch.float32)  # each group weighs the same
        w, b = fit_head(h[fit], y[fit], weight, num_values, int(options["steps"]), float(options["lr"]),
                        float(options["weight_decay"]))
        weights[k], biases[k] = w, b
        train_acc[k] = group_accuracy(h[fit] @ w.T + b, y[fit], g[fit.numpy()])[0]
        acc[k], worst[k] = group_accuracy(h[out] @ w.T + b, y[out], g[out.numpy()])
    with torch.no_grad():
        recorder = HSpaceRecorder()
        with recorder.attached(net):
            net(torch.zeros(1, *image_shape, device=device), torch.ones(1, device=device),
                one_hot(torch.zeros(1, dtype=torch.long), net.label_dim).to(device))
        h_shape = list(recorder.h_shapes[-1])

    counts = np.zeros((len(class_names), num_values))
    np.add.at(counts, (labels, values), 1)
    distribution = (counts / counts.sum(axis=1, keepdims=True).clip(min=1)).tolist()
    rho_per_class = [float(distribution[c][c]) if c < num_values else float("nan") for c in range(len(class_names))]
    settings = {**{k: v for k, v in options.items() if k not in ("sampler", "checkpoint")}, "sampler": sampler,
                "checkpoint": str(checkpoint), "precision": precision, "seconds": time.perf_counter() - start}
    if options["h_source"] != "trajectory":
        settings.pop("trajectory", None)
        settings.pop("oracle", None)
    else:
        settings["samples"] = {k: v for k, v in info.items() if k != "class_log_prior"}
    heads = HeadsFile(weight=weights, bias=biases, sigmas=list(sigmas), attribute=attribute, value_names=value_names,
                      class_names=class_names, data_distribution=distribution, rho_per_class=rho_per_class,
                      accuracy=acc, worst_group_accuracy=worst, train_accuracy=train_acc,
                      checkpoint_sha256=sha256_file(checkpoint), h_shape=h_shape, n_train=int(train.sum()),
                      n_heldout=int(held.sum()), settings=settings, class_log_prior=info.get("class_log_prior"))
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
        source = hf.settings.get("h_source")
        if source == "trajectory":
            source = f"trajectory, w={float(hf.settings['trajectory']['guidance']):g}"
        label = labels[i] if labels else f"{source} ({hf.attribute})"
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
