"""InvDiff (Hou et al., KDD 2025), steps 1 and 2: per-sample losses of the frozen biased model, and the label-free
grouper fitted on them. Plus the group V-REx loss of the later fine-tuning step, and diagnostics that measure
the grouper against the true bias labels (never used to fit anything). No Hydra here: the app is
``python -m biasamp.invdiff_groups`` (biasamp/invdiff_groups.py); the file format is mitigation.groups.

**1. Per-sample losses** (:func:`sample_losses`). For training image i (y_i in [-1, 1], class c_i) and noise levels
sigma_1..sigma_S::

    l_i = (1/S) sum_j lambda(sigma_j) * mean_{C,H,W} (D(y_i + sigma_j n_ij; sigma_j, c_i) - y_i)^2

D is the frozen (EMA) denoiser, lambda the loss weighting of the checkpoint's own training config (``loss.weighting``
and its parameters: biasamp.models.loss.loss_weight), so l_i is the training loss of image i, in D-space, against
the clean image y_i. n_ij = ``IndexNoise(seed, [i], image_shape)(j)``: one fixed draw per (image index, sigma
position), so l_i depends on nothing but (seed, i, the model), never on the batch size or the order.

- Fixed mode (the default, ``n_sigma >= 2`` in the app): sigma_1..sigma_S are the S quantiles of the training
  lognormal (:func:`fixed_sigmas`), the same for every image. Deviation from the released code, on purpose: one
  random sigma per image makes the variance of l_i over the sigma draw swamp the difference between aligned and
  conflicting images; a common fixed set removes it (mitigations.md section 4.2).
- Random mode (``sigmas=None``; the app's ``n_sigma=1``, as the released code): sigma_ij = exp(P_mean + P_std z_ij),
  z_ij = ``IndexNoise(seed, [i], (1,))(SIGMA_DRAW + j)``, one standard normal per (image index, draw), so it is
  just as deterministic and batch-independent. (The released code draws a uniform t of its VP schedule instead.)

Correction of the released code: ``src/group/train_group.py`` compares the UNet's epsilon prediction with the clean
latent (the stored noise target is unused), which looks like a bug (mitigations.md section 4.1 item 1). Here the
loss is the intended one: the denoiser's output against the clean image y_i, i.e. the EDM training loss (in
epsilon terms lambda sigma^2 |eps_hat - eps|^2).

**2. Grouper** (:func:`fit_grouper`), as ``train_group.py``: a soft assignment W (N, K), initialised U(0, 1) from a
seeded generator and row-normalised; group means L_k = sum_i w_ik l_i / sum_i w_ik; maximise the unbiased std over
k of L_k (minimise -std) with Adam (lr 0.01) for 500 full-batch steps; after every step w <- max(w, 0) and each row
renormalised to sum 1 (projection onto the simplex by clamp and normalise). A row that clamps to all zeros is set
to the uniform 1/K (the released code would divide by zero there). The optional ``w_nz`` term of the released code
(+ w_nz min_{i,k} w_ik l_i) is not implemented: its scripts use w_nz = 0. The raw losses are fitted, as the released
code does, without standardising (standardising would divide the objective by std(l), the same ranking, and Adam
is invariant to that scale up to its epsilon; the fit runs in float64).

**3. Group V-REx loss** (:func:`vrex_loss`) of the fine-tuning step: L_k = sum_i g_ik l_i / (sum_i g_ik + 1e-9)
over a batch, groups whose total weight sum_i g_ik is 0 dropped (the released code drops groups with L_k <= 1e-9,
which also drops a present group whose losses are all 0; here only absent groups are dropped), then
mean_k L_k + lambda Var_k L_k (unbiased variance); with one group left, its mean.

**4. Diagnostics** (:func:`grouper_diagnostics`): how well the groups separate bias-conflicting from bias-aligned
images (aligned: bias value == class index, the framework's convention). AUC (Mann-Whitney, ties counted half) of
each group's posterior w_ik for "conflicting" against "aligned", the best group by max(AUC, 1 - AUC); the same per
class; the purity of the hard (argmax) groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from biasamp.data.stream import to_model_range
from biasamp.models import one_hot
from biasamp.models.loss import check_loss_config, loss_weight
from biasamp.sampling import IndexNoise

SIGMA_DRAW = 1_000_000  # random mode: z_ij is draw SIGMA_DRAW + j of image i (the noise n_ij is draw j)
LOSS_DEFAULTS = {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "weighting": "edm", "p2_k": 1.0, "p2_gamma": 1.0,
                 "min_snr_gamma": 5.0}  # EDMLoss's defaults, for keys a checkpoint's loss config lacks
WEIGHT_KEYS = ("sigma_data", "p2_k", "p2_gamma", "min_snr_gamma")


# ------------------------------------------------------------------------------------------------- sigmas, loss
def fixed_sigmas(P_mean: float, P_std: float, n: int) -> list[float]:
    """The n quantiles exp(P_mean + P_std Phi^-1((q - 0.5) / n)), q = 1..n, of the lognormal ln sigma ~ N(P_mean,
    P_std^2), **increasing** (q = 1 first). n = 1 gives the median exp(P_mean)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    p = (torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n
    return [float(s) for s in torch.exp(float(P_mean) + float(P_std) * torch.special.ndtri(p))]


def loss_settings(loss_cfg: Mapping[str, Any] | None) -> tuple[Callable[[Tensor], Tensor], dict[str, Any]]:
    """(lambda(sigma), the resolved loss settings) of a checkpoint's ``loss`` config (``meta["config"]["loss"]``):
    its weighting and parameters, missing keys as EDMLoss's defaults. UsageError for a config EDMLoss refuses."""
    cfg = dict(loss_cfg or {})
    check_loss_config(cfg)
    resolved = {k: cfg.get(k, v) for k, v in LOSS_DEFAULTS.items()}
    resolved = {k: v if k == "weighting" else float(v) for k, v in resolved.items()}
    fn = partial(loss_weight, weighting=resolved["weighting"], **{k: resolved[k] for k in WEIGHT_KEYS})
    return fn, resolved


@torch.no_grad()
def sample_losses(denoiser: Callable[..., Tensor], images: Tensor, labels: Tensor | None,
                  sigmas: Sequence[float] | None, n_sigma: int | None, loss_weight_fn: Callable[[Tensor], Tensor],
                  seed: int, batch_size: int, device: torch.device | str, *, indices: Tensor | None = None,
                  P_mean: float = -1.2, P_std: float = 1.2) -> Tensor:
    """Per-sample loss l (N,) float64 on the CPU (formula in the module docstring).

    denoiser: called as denoiser(x, sigma (B,), class_labels (B, label_dim) | None) (an EDMPrecond or a
    FastDenoiser); images (N, C, H, W), uint8 in [0, 255] or float in [-1, 1]; labels (N,) class indices, or None
    for an unconditional model; sigmas: the fixed set (then ``n_sigma`` is None or len(sigmas)), or None for random
    mode with ``n_sigma`` draws per image from ln sigma ~ N(P_mean, P_std^2); loss_weight_fn: lambda(sigma) (see
    :func:`loss_settings`); indices (N,): each image's index for its noise streams (default 0..N-1: its position).
    Each sigma is used as float32, as the network sees it, for the noise, the network and lambda alike.
    """
    n = int(images.shape[0])
    if sigmas is not None:
        grid = [float(s) for s in sigmas]
        if not grid or any(not math.isfinite(s) or s <= 0 for s in grid):
            raise ValueError(f"sigmas must be a non-empty list of finite numbers > 0, got {list(sigmas)!r}")
        if n_sigma is not None and int(n_sigma) != len(grid):
            raise ValueError(f"n_sigma={n_sigma!r} differs from the {len(grid)} sigmas given")
        draws = len(grid)
    else:
        if isinstance(n_sigma, bool) or not isinstance(n_sigma, int) or n_sigma < 1:
            raise ValueError(f"random mode needs n_sigma, an integer >= 1, got {n_sigma!r}")
        grid, draws = None, int(n_sigma)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device)
    indices = torch.arange(n, dtype=torch.int64) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    if indices.shape != (n,):
        raise ValueError(f"indices must have shape ({n},), got {tuple(indices.shape)}")
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    shape = tuple(int(s) for s in images.shape[1:])
    out = torch.zeros(n, dtype=torch.float64)
    for lo in range(0, n, batch_size):
        rows = slice(lo, min(lo + batch_size, n))
        idx = indices[rows].to(device)
        y = to_model_range(images[rows]).to(device)
        c = None if labels is None or label_dim == 0 else one_hot(torch.as_tensor(labels[rows]), label_dim).to(device)
        noise = IndexNoise(seed, idx, shape, device=device)
        total = torch.zeros(len(idx), dtype=torch.float64, device=device)
        for j in range(draws):
            if grid is not None:
                s = torch.full((len(idx),), grid[j], dtype=torch.float32, device=device)
            else:
                z = IndexNoise(seed, idx, (1,), device=device)(SIGMA_DRAW + j)[:, 0].to(torch.float64)
                s = torch.exp(float(P_mean) + float(P_std) * z).to(torch.float32)
            x = y + s.reshape(-1, 1, 1, 1) * noise(j)
            d = denoiser(x, s, c).to(torch.float32)
            error = (d - y).square().flatten(1).mean(dim=1).to(torch.float64)
            total += loss_weight_fn(s.to(torch.float64)).to(torch.float64) * error
        out[rows] = (total / draws).cpu()
    return out


# ------------------------------------------------------------------------------------------------------ grouper
def project_rows(w: Tensor) -> Tensor:
    """Clamp at 0 and renormalise every row to sum 1, in place; a row that clamps to all zeros becomes 1/K."""
    w.clamp_(min=0.0)
    total = w.sum(dim=1, keepdim=True)
    empty = total[:, 0] <= 0
    if bool(empty.any()):
        w[empty] = 1.0 / w.shape[1]
        total[empty] = 1.0
    return w.div_(total)


def group_means(losses: Tensor, w: Tensor, eps: float = 0.0) -> Tensor:
    """L_k = sum_i w_ik l_i / (sum_i w_ik + eps), (K,)."""
    return (w * losses[:, None]).sum(dim=0) / (w.sum(dim=0) + eps)


def fit_grouper(losses: Tensor | np.ndarray | Sequence[float], K: int = 8, steps: int = 500, lr: float = 0.01,
                seed: int = 0) -> Tensor:
    """The soft groups W (N, K) float32, every row on the simplex, that maximise the unbiased std over k of the
    group means L_k (module docstring). Deterministic given (losses, K, steps, lr, seed)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"K must be an integer >= 2, got {K!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not math.isfinite(float(lr)) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    ell = torch.as_tensor(np.asarray(losses, dtype=np.float64)).reshape(-1)
    if ell.numel() < 1 or not bool(torch.isfinite(ell).all()):
        raise ValueError("losses must be a non-empty vector of finite numbers")
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.rand(ell.shape[0], K, generator=gen, dtype=torch.float64)
    w = project_rows(w).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=float(lr))
    for _ in range(steps):
        opt.zero_grad()
        loss = -group_means(ell, w).std()
        loss.backward()
        opt.step()
        with torch.no_grad():
            project_rows(w)
    return w.detach().to(torch.float32)


def true_groups(labels: np.ndarray, values: np.ndarray) -> tuple[Tensor, list[list[int]]]:
    """Hard one-hot W (N, G) float32 over the (class, bias value) pairs present (sorted), and those pairs."""
    labels, values = np.asarray(labels, dtype=np.int64), np.asarray(values, dtype=np.int64)
    pairs, member = np.unique(np.stack([labels, values], axis=1), axis=0, return_inverse=True)
    member = torch.as_tensor(member.reshape(-1))
    w = torch.nn.functional.one_hot(member, len(pairs)).to(torch.float32)
    return w, [[int(a), int(b)] for a, b in pairs]


# ------------------------------------------------------------------------------------------------------ V-REx
def vrex_loss(per_sample_loss: Tensor, g: Tensor, lam: float) -> Tensor:
    """mean_k L_k + lam Var_k L_k (unbiased), L_k = sum_i g_ik l_i / (sum_i g_ik + 1e-9) over the groups whose total
    weight sum_i g_ik is not 0 (the others are dropped); one group left: its L_k. Differentiable in both inputs.

    per_sample_loss (B,), g (B, K) non-negative group weights (soft or one-hot). ValueError when no group has any
    weight."""
    if per_sample_loss.ndim != 1 or g.ndim != 2 or g.shape[0] != per_sample_loss.shape[0]:
        raise ValueError(f"per_sample_loss must be (B,) and g (B, K), got {tuple(per_sample_loss.shape)} and "
                         f"{tuple(g.shape)}")
    mass = g.sum(dim=0)
    present = mass != 0
    if not bool(present.any()):
        raise ValueError("no group has any weight in this batch")
    means = (g[:, present] * per_sample_loss[:, None]).sum(dim=0) / (mass[present] + 1e-9)
    if means.numel() == 1:
        return means[0]
    return means.mean() + float(lam) * means.var(unbiased=True)


# ------------------------------------------------------------------------------------------------- diagnostics
def auc(scores: np.ndarray | Sequence[float], positive: np.ndarray | Sequence[bool]) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counting 1/2; from average ranks.
    NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # the 1-based rank of each distinct value's first occurrence
    ranks = (first + (counts - 1) / 2.0)[inverse.reshape(-1)]  # tied values share their average rank
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def best_group_auc(w: np.ndarray, conflicting: np.ndarray) -> dict[str, Any]:
    """The group whose posterior w_ik best separates conflicting from aligned images: {auc = max(AUC, 1 - AUC),
    group, auc_raw (AUC of that group, conflicting positive), auc_per_group}; None values when a side is empty."""
    raw = [auc(w[:, k], conflicting) for k in range(w.shape[1])]
    if not all(math.isfinite(a) for a in raw):
        return {"auc": None, "group": None, "auc_raw": None, "auc_per_group": [None] * w.shape[1]}
    folded = [max(a, 1.0 - a) for a in raw]
    k = int(np.argmax(folded))  # the first of equals
    return {"auc": folded[k], "group": k, "auc_raw": raw[k], "auc_per_group": raw}


def grouper_diagnostics(W: Tensor | np.ndarray, aligned: np.ndarray | Sequence[bool],
                        classes: np.ndarray | Sequence[int], losses: Tensor | np.ndarray | None = None
                        ) -> dict[str, Any]:
    """How the groups W (N, K) relate to the true bias-aligned flag of each image (never used for fitting).

    Returns plain numbers (JSON- and weights-only-safe; None where undefined):

    - ``auc``, ``group``, ``auc_raw``, ``auc_per_group``: see :func:`best_group_auc` (all images);
    - ``per_class``: {class index (str): the same plus ``n_aligned``, ``n_conflicting``}, within each class;
    - ``purity``: the hard groups (argmax_k w_ik, first of equals): the share of the majority (aligned or
      conflicting) among each non-empty group's members, averaged over groups weighted by their size (=
      sum_k max(a_k, c_k) / N); ``purity_baseline``: the same for one group of all images (max(share aligned,
      share conflicting)): a grouper that separates nothing;
    - ``hard_sizes``, ``hard_conflicting`` (K,): members and conflicting members of each hard group;
      ``soft_mass`` (K,): sum_i w_ik; ``soft_conflicting_share`` (K,): sum_i w_ik [i conflicting] / sum_i w_ik;
    - ``n``, ``n_aligned``, ``n_conflicting``, ``K``;
    - with ``losses``: ``loss_auc`` (AUC of l itself, conflicting positive: above 0.5 when the model fits the
      conflicting images worse) and ``group_loss`` (K,): L_k.
    """
    w = np.asarray(W.detach().cpu().numpy() if isinstance(W, Tensor) else W, dtype=np.float64)
    al = np.asarray(aligned, dtype=bool).reshape(-1)
    cls = np.asarray(classes, dtype=np.int64).reshape(-1)
    if w.ndim != 2 or w.shape[0] != al.shape[0] or cls.shape[0] != al.shape[0]:
        raise ValueError(f"W must be (N, K) with N = len(aligned) = len(classes), got {w.shape}, {al.shape[0]}, "
                         f"{cls.shape[0]}")
    conf = ~al
    n, k = w.shape
    out: dict[str, Any] = {"n": int(n), "n_aligned": int(al.sum()), "n_conflicting": int(conf.sum()), "K": int(k)}
    out.update(best_group_auc(w, conf))
    per_class = {}
    for c in np.unique(cls):
        rows = cls == c
        entry = best_group_auc(w[rows], conf[rows])
        entry.update(n_aligned=int(al[rows].sum()), n_conflicting=int(conf[rows].sum()))
        per_class[str(int(c))] = entry
    out["per_class"] = per_class
    hard = w.argmax(axis=1)
    sizes = np.bincount(hard, minlength=k)
    hard_conf = np.bincount(hard, weights=conf.astype(np.float64), minlength=k).astype(np.int64)
    majority = np.maximum(hard_conf, sizes - hard_conf)
    out["purity"] = float(majority.sum() / n) if n else None
    out["purity_baseline"] = float(max(al.sum(), conf.sum()) / n) if n else None
    out["hard_sizes"] = [int(x) for x in sizes]
    out["hard_conflicting"] = [int(x) for x in hard_conf]
    mass = w.sum(axis=0)
    out["soft_mass"] = [float(x) for x in mass]
    share = (w * conf[:, None]).sum(axis=0) / np.where(mass > 0, mass, 1.0)
    out["soft_conflicting_share"] = [_num(float(s)) if m > 0 else None for s, m in zip(share, mass, strict=True)]
    if losses is not None:
        ell = np.asarray(losses.detach().cpu().numpy() if isinstance(losses, Tensor) else losses, dtype=np.float64)
        out["loss_auc"] = _num(auc(ell, conf))
        gl = (w * ell[:, None]).sum(axis=0) / np.where(mass > 0, mass, 1.0)
        out["group_loss"] = [_num(float(x)) if m > 0 else None for x, m in zip(gl, mass, strict=True)]
    for key in ("auc", "auc_raw"):
        out[key] = None if out[key] is None else _num(out[key])
    return out


def diagnostics_line(d: Mapping[str, Any]) -> str:
    """One line: best-group AUC (its group), per-class AUCs, purity (and its baseline), the loss's own AUC."""
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    per = ", ".join(f"{c}: {f(e['auc'])}" for c, e in d.get("per_class", {}).items())
    text = (f"best-group AUC {f(d.get('auc'))} (group {d.get('group')}, raw {f(d.get('auc_raw'))}); per class "
            f"{per}; purity {f(d.get('purity'))} (one group: {f(d.get('purity_baseline'))})")
    if "loss_auc" in d:
        text += f"; loss AUC {f(d.get('loss_auc'))}"
    return text
