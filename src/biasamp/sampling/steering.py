"""Steering in h-space: Balancing Act's distribution and sample guidance (Parihar et al., CVPR 2024).

h is the output of DDPM++'s lowest-resolution decoder block ``dec["<r>x<r>_in1"]`` (the counterpart of ADM's
``middle_block``), before the first decoder block concatenates an encoder skip; a forward hook reads and
replaces it, so the network itself is unchanged. A linear head per noise level sigma maps flattened h (D,) to
logits z = W h + b over the V values of one bias attribute; p = softmax(z / T) with temperature T.

**Distribution guidance** (``mode="distribution"``), per block g of a class's samples (its real rows i in g,
n_g of them) at every denoiser evaluation inside the sigma window:

    p_hat_g = (1/n_g) sum_i p_i,
    L_g = sum_k (p_hat_gk - t_k)^2 / t_k  (chi2)   or   sum_k p_hat_gk log(p_hat_gk / t_k)  (kl),
    h_i <- h_i - scale * d(n_g L_g)/d h_i

with t the class's target distribution. The released code steps h_i by a multiple of dL_g/dh_i, which shrinks
like 1/n_g with the batch (its README: "if any other [batch size], scale needs to be tuned"); the gradient of
n_g L_g moves every row as far for any block size, so ``scale`` does not depend on B. The loss depends on h only
through the linear head, so the gradient is exact in closed form (no autograd: it runs under inference mode,
with bf16 autocast, on any device): with u = dL/dp_hat,

    d(n_g L_g)/d z_i = p_i * (u - <u, p_i>) / T,      d(n_g L_g)/d h_i = W^T d(n_g L_g)/d z_i.

chi2: u = 2 (p_hat - t) / t;  kl: u = log(p_hat / t) + 1.

**A class's prior.** Heads fitted on a balanced resample of (class, value) groups output, where h does not yet
decide the value, about 1/V for each value, so the block mean p_hat understates a class's majority value and chi2
toward a non-uniform target pushes toward the majority. Heads fitted on the model's own samples (``h_source=
trajectory`` of the head app) carry each class's log share of each value among those samples; it is added to the
logits of that class's rows (``LinearHeads.class_bias``), the label-shift correction of a balanced classifier to
the model's prior (Saerens et al., 2002).

**Sample guidance** (``mode="sample"``): every row toward one value v, L = -sum_i p_i[v] (the released code's
sum over rows), so u = -e_v for every row and a row's step depends on that row alone.

**Classifier-free guidance.** The network sees m B rows for B samples (cond rows first, then the uncond
branch's). p_hat is taken over the cond rows; ``branches="all"`` adds the same Δh_i to every branch's row of
sample i (the guided combination (1 + w) D_c - w D_u then moves like one steered denoiser), ``branches="cond"``
only to the cond rows (the steering is then amplified (1 + w)-fold through the guidance).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

STEER_MODES = ("none", "distribution", "sample")
STEER_LOSSES = ("chi2", "kl")
STEER_BRANCHES = ("all", "cond")
HSPACE_SUFFIX = "_in1"
SIGMA_RTOL = 1e-5  # a head's sigma matches an evaluated sigma within this relative distance (float32 rounding)


def hspace_block(denoiser: object) -> nn.Module:
    """The block whose output is h: ``dec["<r>x<r>_in1"]`` of the DDPM++ inside ``denoiser`` (an EDMPrecond, a
    FastDenoiser around one, or the DDPM++ itself)."""
    net = denoiser if hasattr(denoiser, "dec") else getattr(denoiser, "net", None)
    dec = getattr(net, "dec", None)
    names = [name for name in (dec.keys() if isinstance(dec, nn.ModuleDict) else []) if name.endswith(HSPACE_SUFFIX)]
    if len(names) != 1:
        raise ValueError(f"no single '*{HSPACE_SUFFIX}' decoder block (h-space) in {type(net).__name__}: found "
                         f"{names}")
    return dec[names[0]]


@contextlib.contextmanager
def hooked(denoiser: object, hook: Callable) -> Iterator[None]:
    """A forward hook on the h-space block of ``denoiser`` for the duration of a ``with`` block."""
    handle = hspace_block(denoiser).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def matching_head(sigmas: Tensor, sigma: float) -> int | None:
    """Index of the head whose sigma equals ``sigma`` within SIGMA_RTOL, or None."""
    rel = (sigmas.double() - float(sigma)).abs() / max(abs(float(sigma)), 1e-12)
    k = int(torch.argmin(rel))
    return k if float(rel[k]) <= SIGMA_RTOL else None


def head_step(h: Tensor, weight: Tensor, bias: Tensor, temperature: float, u: Tensor) -> tuple[Tensor, Tensor]:
    """The closed-form gradient of a loss of p = softmax((W h + b) / T) with respect to h.

    h (N, D), weight (V, D), bias (V,), u (N, V): the loss's derivative dL/dp per row (constant in p, as for the
    losses above). Returns (dL/dh (N, D), p (N, V)), float32."""
    p = torch.softmax((h @ weight.T + bias) / temperature, dim=1)  # p_i = softmax(z_i / T)
    dz = p * (u - (u * p).sum(dim=1, keepdim=True)) / temperature  # dL/dz_i = p_i ⊙ (u_i − <u_i, p_i>) / T
    return dz @ weight, p  # dL/dh_i = Wᵀ dL/dz_i


def block_means(p: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """p_hat (G, V): the mean of p's rows per group id (rows with group -1, the padding, left out)."""
    member = (groups.unsqueeze(0) == torch.arange(n_groups, device=p.device).unsqueeze(1)).to(p.dtype)  # (G, N)
    return (member @ p) / member.sum(dim=1, keepdim=True).clamp_min(1.0)


def distribution_u(p_hat: Tensor, target: Tensor, loss: str) -> Tensor:
    """dL/dp_hat per group (G, V): chi2 2 (p_hat − t)/t; kl log(p_hat/t) + 1."""
    if loss == "chi2":
        return 2.0 * (p_hat - target) / target
    return torch.log(p_hat.clamp_min(1e-12) / target) + 1.0


def distribution_loss(p_hat: Tensor, target: Tensor, loss: str) -> Tensor:
    """L per group (G,): chi2 Σ_k (p_hat_k − t_k)²/t_k; kl Σ_k p_hat_k log(p_hat_k/t_k)."""
    if loss == "chi2":
        return ((p_hat - target) ** 2 / target).sum(dim=1)
    return (p_hat * torch.log(p_hat.clamp_min(1e-12) / target)).sum(dim=1)


@dataclass(frozen=True)
class LinearHeads:
    """One linear head per noise level: weight (S, V, D), bias (S, V) float32; sigmas (S,) float64 decreasing.

    class_bias (K, V) or None: added to the logits of class k's rows at every level (heads trained on a balanced
    resample, corrected to a class's own prior: log pi_k(v), Saerens et al. 2002; with T = 1 the block mean of p
    then estimates the block's share of each value)."""

    weight: Tensor
    bias: Tensor
    sigmas: Tensor
    class_bias: Tensor | None = None

    def to(self, device: torch.device | str) -> LinearHeads:
        extra = None if self.class_bias is None else self.class_bias.to(device)
        return LinearHeads(self.weight.to(device), self.bias.to(device), self.sigmas, extra)

    def logit_bias(self, head: int, class_index: int) -> Tensor:
        """The bias (V,) of level ``head`` for rows of class ``class_index``."""
        if self.class_bias is None:
            return self.bias[head]
        return self.bias[head] + self.class_bias[class_index]


class HSpaceSteerer:
    """Steers h during sampling; ``denoiser`` wraps a sampler's D(x, sigma) for one class and one set of rows,
    ``attached`` registers the hook on the network for a ``with`` block.

    targets: (K, V) per-class target distributions (mode distribution) or None; target_value: v (mode sample).
    window: (sigma_lo, sigma_hi), steering where lo <= sigma <= hi. ``steered_calls`` counts the evaluations that
    were steered."""

    def __init__(self, heads: LinearHeads, mode: str, scale: float, temperature: float = 8.0,
                 window: tuple[float, float] = (0.0, math.inf), loss: str = "chi2", branches: str = "all",
                 targets: Tensor | None = None, target_value: int | None = None) -> None:
        if mode not in STEER_MODES[1:] or loss not in STEER_LOSSES or branches not in STEER_BRANCHES:
            raise ValueError(f"mode={mode!r}, loss={loss!r}, branches={branches!r}")
        if mode == "distribution" and targets is None or mode == "sample" and target_value is None:
            raise ValueError(f"mode={mode} needs {'targets' if mode == 'distribution' else 'target_value'}")
        self.heads, self.mode, self.scale, self.temperature = heads, mode, float(scale), float(temperature)
        self.window, self.loss, self.branches = (float(window[0]), float(window[1])), loss, branches
        self.targets = None if targets is None else targets.to(torch.float32)
        self.target_value = target_value
        self.steered_calls = 0
        self.trace: dict[tuple[int, int], tuple[Tensor, int]] = {}  # (class, head) -> (Σ p, rows); trace_table
        self._active: tuple[int, int, Tensor, int] | None = None  # (head, class index, groups, G) during a call

    def denoiser(self, inner: Callable[[Tensor, Tensor], Tensor], class_index: int, groups: Tensor
                 ) -> Callable[[Tensor, Tensor], Tensor]:
        """D(x, sigma) of ``inner`` with h steered for samples of class ``class_index``; groups (B,): the block
        of each sample row (ids 0..G-1; -1: a padding row, left out of every p_hat and not steered)."""

        n_groups = int(groups.max()) + 1 if bool((groups >= 0).any()) else 0

        def steered(x: Tensor, sigma: Tensor) -> Tensor:
            s = float(sigma.reshape(-1)[0])  # the samplers evaluate one sigma per call
            lo, hi = self.window
            head = matching_head(self.heads.sigmas, s) if lo <= s <= hi else None
            if lo <= s <= hi and head is None:
                raise ValueError(f"no h-space head for sigma={s!r} (heads: {self.heads.sigmas.tolist()})")
            self._active = None if head is None else (head, class_index, groups.to(x.device), n_groups)
            try:
                return inner(x, sigma)
            finally:
                self._active = None

        return steered

    def delta(self, h: Tensor, head: int, class_index: int, groups: Tensor, n_groups: int) -> Tensor:
        """-d(n_g L_g)/dh (distribution) or -dL/dh (sample) for the sample rows h (B, D), float32."""
        weight, bias = self.heads.weight[head], self.heads.logit_bias(head, class_index)
        real = groups >= 0
        if self.mode == "sample":
            u = torch.zeros(h.shape[0], weight.shape[0], device=h.device)
            u[:, self.target_value] = -1.0  # L = −Σ_i p_i[v]
        else:
            p = torch.softmax((h @ weight.T + bias) / self.temperature, dim=1)
            target = self.targets[class_index].to(h.device).expand(max(n_groups, 1), -1)
            u = distribution_u(block_means(p, groups, n_groups), target, self.loss)[groups.clamp_min(0)]
        grad, p = head_step(h, weight, bias, self.temperature, u)
        key = (class_index, head)  # the heads' view before the step: Σ over real rows of p, and their number
        total, rows = self.trace.get(key, (torch.zeros(p.shape[1], dtype=torch.float64), 0))
        self.trace[key] = (total + p[real].sum(dim=0).double().cpu(), rows + int(real.sum()))
        return -grad * real.unsqueeze(1).to(grad.dtype)

    def trace_table(self, class_names: list[str]) -> list[dict]:
        """The heads' mean p (at temperature T, before each step) per class and steered sigma, over the rows this
        process steered: [{class, sigma, p: [V shares], rows}], sigma decreasing. It shows where the heads
        consider the target met (compare with the oracle's counts)."""
        out = []
        for (c, head), (total, rows) in sorted(self.trace.items(), key=lambda kv: (kv[0][0], -float(
                self.heads.sigmas[kv[0][1]]))):
            out.append({"class": class_names[c], "sigma": float(self.heads.sigmas[head]),
                        "p": [round(float(x), 4) for x in total / max(rows, 1)], "rows": rows})
        return out

    def hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if self._active is None:
            return None
        head, class_index, groups, n_groups = self._active
        batch = groups.shape[0]
        rows = output.shape[0]
        if rows % batch:
            raise RuntimeError(f"h-space hook: {rows} network rows for {batch} samples")
        with torch.autocast(device_type=output.device.type, enabled=False):
            h = output[:batch].reshape(batch, -1).to(torch.float32)  # the cond rows (B, D)
            step = self.scale * self.delta(h, head, class_index, groups, n_groups)
            if rows > batch:
                copies = rows // batch if self.branches == "all" else 1
                step = torch.cat([step.repeat(copies, 1), step.new_zeros(rows - copies * batch, step.shape[1])])
        self.steered_calls += 1
        return output + step.reshape(output.shape).to(output.dtype)  # h ← h − scale ∇_h

    def attached(self, denoiser: object) -> contextlib.AbstractContextManager:
        """``with steerer.attached(net):`` the hook edits h of every forward of ``net``."""
        return hooked(denoiser, self.hook)


class HSpaceRecorder:
    """Records h (the hspace block's output, flattened (B, D) float32) of every forward while attached."""

    def __init__(self) -> None:
        self.h: list[Tensor] = []
        self.h_shapes: list[tuple[int, ...]] = []  # h's (C, r, r) per forward

    def hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.h.append(output.reshape(output.shape[0], -1).to(torch.float32))
        self.h_shapes.append(tuple(output.shape[1:]))

    def attached(self, denoiser: object) -> contextlib.AbstractContextManager:
        """``with recorder.attached(net):`` h of every forward of ``net`` is recorded."""
        return hooked(denoiser, self.hook)
