"""Exponential moving average of weights, parametrised by a half-life in images (EDM).

EDM defines the EMA decay through the number of images over which a weight's contribution halves:
h = ema_halflife_kimg * 1000 images, shortened during the ramp-up to h = min(h, n_img * rampup_ratio),
and per optimizer step (which consumes ``batch_total`` images over all ranks and accumulation rounds)
beta = 0.5 ** (batch_total / h); then p_ema <- beta * p_ema + (1 - beta) * p.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(n_img: int, batch_total: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EMA decay for one optimizer step taken when ``n_img`` images had been seen before it."""
    halflife_img = halflife_kimg * 1000.0
    if rampup_ratio is not None:
        halflife_img = min(halflife_img, n_img * rampup_ratio)
    return 0.5 ** (batch_total / max(halflife_img, 1e-8))


class EMA(nn.Module):
    """A frozen copy of ``model`` that follows it with :func:`ema_beta` decay.

    Parameters are averaged; buffers (none in DDPM++, kept for generality) are copied.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        # lerp: p_ema + (1 - beta) * (p - p_ema) = beta * p_ema + (1 - beta) * p
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def train(self, mode: bool = True) -> EMA:  # the average is never in training mode (no dropout)
        super().train(False)
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
