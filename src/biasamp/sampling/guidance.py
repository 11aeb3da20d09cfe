"""Classifier-free guidance (Ho & Salimans 2022) around an EDMPrecond-like net(x, sigma, class_labels).

Convention (the seed's, used throughout biasamp):

    D_w = (1 + w) D_cond - w D_uncond,        w = ``guidance`` >= 0; w = 0 is plain conditional sampling.

The other common convention writes D_uncond + s (D_cond - D_uncond) with scale s = 1 + w, so s = 1 is plain
conditional sampling (e.g. the seed's discrete DDPM path, Stable Diffusion's ``guidance_scale``); convert with
``guidance_from_scale``.

Unconditional branch (``uncond``): "null" evaluates the net at the all-zero label vector (the input label
dropout trains); "class_mean" uses the mean of D over the K one-hot labels e_1..e_K.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from biasamp.errors import UsageError

UNCOND_MODES = ("null", "class_mean")


def apply_guidance(d_cond: Tensor, d_uncond: Tensor, guidance: float) -> Tensor:
    """D_w = (1 + w) D_cond - w D_uncond (any matching shapes)."""
    return (1.0 + guidance) * d_cond - guidance * d_uncond  # CFG, seed convention: (1 + w) D_c − w D_u


def guidance_from_scale(scale: float) -> float:
    """w of the seed's convention for a scale s of D_u + s (D_c - D_u): w = s - 1 (s >= 1)."""
    if not scale >= 1:
        raise UsageError(f"guidance scale={scale!r} is not allowed: must be >= 1 (s = 1 + w)")
    return float(scale) - 1.0


class GuidedDenoiser:
    """D(x, sigma) -> Tensor with labels and guidance closed over; see ``guided_denoiser``.

    Attribute ``nfe``: network evaluations per sample so far (a forward over m * B rows for B samples adds m).
    Attribute ``calls``: forwards of the net so far.
    """

    def __init__(self, net, class_labels: Tensor | None, guidance: float, uncond: str,
                 interval: tuple[float, float] | None, label_dim: int | None) -> None:
        if not (isinstance(guidance, numbers.Real) and not isinstance(guidance, bool) and math.isfinite(guidance)
                and guidance >= 0):
            raise UsageError(f"guidance={guidance!r} is not allowed: must be a finite number >= 0 "
                             "(w in (1 + w) D_cond - w D_uncond; 0 = plain conditional)")
        if uncond not in UNCOND_MODES:
            raise UsageError(f"guidance_uncond={uncond!r} is not allowed: must be one of {', '.join(UNCOND_MODES)}")
        if interval is not None:
            try:
                lo, hi = (float(v) for v in interval)
            except (TypeError, ValueError):
                raise UsageError(f"guidance_interval={interval!r} is not allowed: give [lo, hi] with 0 <= lo <= hi "
                                 "(sigmas)") from None
            if not 0 <= lo <= hi:
                raise UsageError(f"guidance_interval={tuple(interval)!r} is not allowed: need 0 <= lo <= hi")
            interval = (lo, hi)
        if class_labels is not None:
            if class_labels.ndim != 2:
                raise ValueError(f"class_labels must be (B, K) one-hot, got shape {tuple(class_labels.shape)}")
            if label_dim is not None and class_labels.shape[1] != label_dim:
                raise ValueError(f"class_labels have {class_labels.shape[1]} columns but label_dim={label_dim}")
            class_labels = class_labels.to(torch.float32)
        self.net = net
        self.class_labels = class_labels
        self.guidance = float(guidance)
        self.uncond = uncond
        self.interval = interval
        self.label_dim = class_labels.shape[1] if class_labels is not None else label_dim
        self.nfe = 0
        self.calls = 0

    def _forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None, n_samples: int) -> Tensor:
        self.calls += 1
        self.nfe += x.shape[0] // n_samples
        return self.net(x, sigma, labels)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x (B, C, H, W), sigma (B,) -> D_w(x; sigma) float32 (B, C, H, W)."""
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        if self.class_labels is None:
            return self._forward(x, sigma, None, batch)  # unconditional samples: no guidance applies
        if self.class_labels.shape[0] not in (1, batch):
            raise ValueError(f"class_labels hold {self.class_labels.shape[0]} rows for a batch of {batch} samples")
        labels = self.class_labels.to(x.device).expand(batch, -1)
        if self.guidance == 0:
            return self._forward(x, sigma, labels, batch)
        inside = None
        if self.interval is not None:
            inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])  # guide only where lo <= σ <= hi
            if not bool(inside.any()):  # (one host sync per call on an accelerator)
                return self._forward(x, sigma, labels, batch)  # no sample guided: skip the uncond rows
        if self.uncond == "null":
            branch_labels = [labels, torch.zeros_like(labels)]
        else:
            eye = torch.eye(labels.shape[1], dtype=labels.dtype, device=labels.device)
            branch_labels = [labels, *(row.expand(batch, -1) for row in eye)]
        n_branch = len(branch_labels)
        out = self._forward(x.repeat(n_branch, 1, 1, 1), sigma.repeat(n_branch), torch.cat(branch_labels), batch)
        out = out.reshape(n_branch, batch, *out.shape[1:])
        d_cond = out[0]
        d_uncond = out[1] if n_branch == 2 else out[1:].mean(dim=0)  # class_mean: (1/K) Σ_k D(x; σ, e_k)
        guided = apply_guidance(d_cond, d_uncond, self.guidance)
        if inside is not None:
            guided = torch.where(inside.reshape(-1, *([1] * (x.ndim - 1))), guided, d_cond)
        return guided


def guided_denoiser(net, class_labels: Tensor | None, guidance: float = 0.0, uncond: str = "null",
                    interval: tuple[float, float] | None = None, label_dim: int | None = None) -> GuidedDenoiser:
    """A denoiser D(x (B,C,H,W), sigma (B,)) for the samplers, from net(x, sigma, class_labels).

    class_labels: one-hot float (B, K) (or (1, K), broadcast), or None for unconditional samples (then
    net(x, sigma, None), one forward, guidance ignored). guidance = w >= 0 of (1 + w) D_cond - w D_uncond; when
    w > 0 the conditional and unconditional branches run in ONE forward: 2B rows for uncond="null" (zeros labels),
    (K + 1) B rows for uncond="class_mean". interval = (lo, hi): guide only the samples with lo <= sigma <= hi,
    the plain conditional D elsewhere (a batch with no sample inside takes a single B-row forward).
    The result counts network evaluations per sample in its ``nfe`` attribute.
    """
    return GuidedDenoiser(net, class_labels, guidance, uncond, interval, label_dim)
