"""InvDiff's mixed network (Hou et al., KDD 2025): a frozen base DDPM++ and a trainable side network Delta.

    convex:    F_mix(x, c_noise, y) = r F_Delta(x, c_noise, y) + (1 - r) F_frozen(x, c_noise, y),   -1 < r <= 1
    residual:  F_mix(x, c_noise, y) = F_frozen(x, c_noise, y) + r F_Delta(x, c_noise, y)

under the base model's EDM preconditioning, so D_mix = c_skip x + c_out F_mix. D is affine in F, so mixing F is
mixing D (and epsilon) with the same weights. The released code (``src/model/epsilon_with_delta.py``) uses the
convex form with r = 0.8 for training and sampling; Delta's output convolution starts at zero, so a fresh convex mix
starts from 0.2 F_frozen, not from the base model. ``residual`` starts exactly at the base model.

Delta is a deep copy of the base network (the released ``DELTA_TYPE=pretrain``) or, with ``delta_channels``, a
freshly initialised DDPM++ of that base width and otherwise the base's configuration; either way its
``out_conv`` weight and bias are zeroed.

Label dropout (for classifier-free guidance) is drawn once here and the same labels go to both networks, so a
dropped row is unconditional in both; the two networks' own label dropout is switched off. The frozen network
stays in eval mode (no dropout) whatever mode the module is put in, and its parameters never require grad.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from biasamp.errors import UsageError
from biasamp.models.ddpmpp import DDPMpp

MIX_MODES = ("convex", "residual")


def check_mix(r: Any, mix: Any) -> tuple[float, str]:
    """(r, mix) checked: UsageError with one line otherwise."""
    if mix not in MIX_MODES:
        raise UsageError(f"invdiff.mix={mix!r} is not allowed: use convex (r F_delta + (1 - r) F_frozen, the "
                         "released code's) or residual (F_frozen + r F_delta)")
    ok = isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(float(r))
    if not ok or not -1.0 < float(r) <= 1.0:
        raise UsageError(f"invdiff.r={r!r} is not allowed: a number in (-1, 1] (the released code's 0.8; 0: the base "
                         "model)")
    return float(r), str(mix)


def zero_output(net: DDPMpp) -> DDPMpp:
    """Zero ``net.out_conv``'s weight and bias in place (the network then outputs 0 everywhere)."""
    with torch.no_grad():
        net.out_conv.weight.zero_()
        if net.out_conv.bias is not None:
            net.out_conv.bias.zero_()
    return net


def make_delta(base: DDPMpp, net_kwargs: dict[str, Any], delta_channels: int | None = None) -> DDPMpp:
    """Delta: a deep copy of ``base`` (``delta_channels`` None) or a fresh DDPM++ with ``model_channels =
    delta_channels`` and the base's other settings (``net_kwargs``: the base's model.net keyword arguments);
    output layer zeroed."""
    if delta_channels is None:
        delta = copy.deepcopy(base)
    else:
        kwargs = {**net_kwargs, "model_channels": int(delta_channels)}
        delta = DDPMpp(base.img_resolution, base.in_channels, base.out_channels, label_dim=base.label_dim, **kwargs)
    return zero_output(delta.requires_grad_(True))


class MixedNet(nn.Module):
    """F_mix of a frozen base DDPM++ and a side network Delta (module docstring); the DDPM++ call signature."""

    def __init__(self, frozen: DDPMpp, delta: DDPMpp, r: float, mix: str = "convex",
                 label_dropout: float | None = None) -> None:
        super().__init__()
        self.r, self.mix = check_mix(r, mix)
        if (frozen.img_resolution, frozen.in_channels, frozen.out_channels, frozen.label_dim) != (
                delta.img_resolution, delta.in_channels, delta.out_channels, delta.label_dim):
            raise UsageError("invdiff: the side network's resolution, channels or classes differ from the base "
                             "model's; Delta must match the base checkpoint's shape")
        self.label_dropout = float(frozen.label_dropout if label_dropout is None else label_dropout)
        frozen.label_dropout = 0.0
        delta.label_dropout = 0.0
        self.frozen = frozen.requires_grad_(False)
        self.delta = delta
        self.img_resolution, self.in_channels = frozen.img_resolution, frozen.in_channels
        self.out_channels, self.label_dim = frozen.out_channels, frozen.label_dim
        self.frozen.eval()

    def train(self, mode: bool = True) -> MixedNet:
        super().train(mode)
        self.frozen.eval()  # the base never trains: no dropout in it
        return self

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is not None and self.training and self.label_dropout > 0:
            keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
            class_labels = class_labels * keep.to(class_labels.dtype)  # the same rows dropped in both networks
        frozen = self.frozen(x, noise_labels, class_labels)
        if self.r == 0:
            return frozen  # exactly the base model
        delta = self.delta(x, noise_labels, class_labels)
        if self.mix == "convex":
            return self.r * delta + (1.0 - self.r) * frozen
        return frozen + self.r * delta
