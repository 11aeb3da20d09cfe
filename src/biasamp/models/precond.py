"""EDM preconditioning: the denoiser D(x; sigma, y) around a raw network F (Karras et al. 2022, Table 1).

    D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y)

sigma is the noise standard deviation in image units (images scaled to [-1, 1]); sigma_data is the standard
deviation of the data. Class labels are one-hot float vectors; the all-zero vector is the null
(unconditional) input, which is also what label dropout feeds the network during training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def one_hot(labels: Tensor, label_dim: int) -> Tensor:
    """Integer class indices (B,) -> float32 one-hot vectors (B, label_dim)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} "
                         f"shape {tuple(labels.shape)}")
    if labels.numel() and labels.device.type == "cpu":  # on an accelerator the check would cost a host sync
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= label_dim:
            raise ValueError(f"labels must lie in [0, {label_dim}), got range [{lo}, {hi}]")
    return torch.nn.functional.one_hot(labels.long(), label_dim).to(torch.float32)


def null_labels(batch: int, label_dim: int, device: torch.device | str | None = None) -> Tensor:
    """The unconditional input: zeros (B, label_dim), float32."""
    return torch.zeros(batch, label_dim, dtype=torch.float32, device=device)


class EDMPrecond(nn.Module):
    """Wraps a network F(x_in (B,C,H,W), c_noise (B,), class_labels (B,label_dim) | None) into D.

    Attributes: net, label_dim, sigma_data, sigma_min, sigma_max (the sigma range the sampler should use).
    """

    def __init__(self, net: nn.Module, label_dim: int, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        super().__init__()
        self.net = net
        self.label_dim = int(label_dim)
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """x (B, C, H, W); sigma: float, 0-d tensor or (B,) tensor; class_labels (B, label_dim) or None.

        Returns D(x; sigma, y) as float32, shape (B, C, H, W).
        """
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        elif sigma.numel() != batch:
            raise ValueError(f"sigma must be a scalar or hold one value per sample ({batch}), "
                             f"got {sigma.numel()} values")
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = null_labels(batch, self.label_dim, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32)
            if class_labels.ndim != 2 or class_labels.shape[1] != self.label_dim:
                raise ValueError(f"class_labels must have shape (B, {self.label_dim}), "
                                 f"got {tuple(class_labels.shape)}")
            class_labels = class_labels.expand(batch, -1)

        sd2 = self.sigma_data**2
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip = sd2 / (s**2 + sd2)  # c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()  # c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
        c_in = 1 / (sd2 + s**2).sqrt()  # c_in = 1 / sqrt(sigma_d^2 + sigma^2)
        c_noise = sigma.log() / 4  # c_noise = ln(sigma) / 4, shape (B,)

        F_x = self.net(c_in * x, c_noise, class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)  # D = c_skip x + c_out F(c_in x; c_noise, y)
