"""EDM training loss with a choice of per-sigma weighting, all in D-space (SNR = 1 / sigma^2).

Per sample i: sigma_i = exp(P_mean + P_std * z_i), z_i ~ N(0, 1); n_i ~ N(0, I);
    loss_i = lambda(sigma_i) * mean_{C,H,W} (D(y_i + sigma_i n_i; sigma_i, y) - y_i)^2.
Each sample carries its own weight lambda(sigma_i); the result has shape (B,).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from biasamp.errors import UsageError

WEIGHTINGS = ("edm", "debias", "p2", "min_snr")
TARGETS = ("biasamp.models.EDMLoss", "biasamp.models.loss.EDMLoss")  # the _target_ spellings of EDMLoss


def _check_weighting(weighting: Any) -> None:
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        raise UsageError(f"loss.weighting={weighting!r} is not allowed: use one of {', '.join(WEIGHTINGS)}")


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


# key -> (test, what is allowed), every parameter of EDMLoss but weighting
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "P_mean": (_finite, "a finite number (the mean of ln sigma)"),
    "P_std": (lambda v: _finite(v) and v > 0, "a finite number > 0 (the spread of ln sigma)"),
    "sigma_data": (lambda v: _finite(v) and v > 0, "a finite number > 0 (the data's standard deviation)"),
    "p2_k": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "p2_gamma": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: plain SNR weighting)"),
    "min_snr_gamma": (lambda v: _finite(v) and v > 0, "a finite number > 0 (the SNR cap)"),
}


def check_loss_config(loss_cfg: Mapping[str, Any]) -> None:
    """Check a ``loss`` config (the keyword arguments of :class:`EDMLoss`, plus ``_target_``) before any work.

    Raises UsageError (one line naming ``loss.<key>``, the value and what is allowed) for an unknown key, a
    ``_target_`` other than EDMLoss, a weighting not in WEIGHTINGS, a non-finite P_mean, P_std <= 0,
    sigma_data <= 0, p2_k < 0, p2_gamma < 0 or min_snr_gamma <= 0. Missing keys take EDMLoss's defaults.
    """
    params = [p for p in inspect.signature(EDMLoss.__init__).parameters if p != "self"]
    unknown = sorted(k for k in loss_cfg if k not in params and k != "_target_")
    if unknown:
        raise UsageError(f"loss.{unknown[0]} is not a parameter of EDMLoss; allowed keys: _target_, "
                         f"{', '.join(params)}")
    target = loss_cfg.get("_target_", TARGETS[0])
    if target not in TARGETS:
        raise UsageError(f"loss._target_={target!r} is not allowed: the loss is {TARGETS[0]} (choose its "
                         "weighting with loss.weighting)")
    if "weighting" in loss_cfg:
        _check_weighting(loss_cfg["weighting"])
    for key, (ok, allowed) in _RULES.items():
        if key in loss_cfg and not ok(loss_cfg[key]):
            raise UsageError(f"loss.{key}={loss_cfg[key]!r} is not allowed: {allowed}")


def loss_weight(sigma: Tensor, weighting: str, sigma_data: float = 0.5, p2_k: float = 1.0,
                p2_gamma: float = 1.0, min_snr_gamma: float = 5.0) -> Tensor:
    """Weight lambda(sigma) of the squared D-space error; same shape as sigma.

    edm:     (sigma^2 + sigma_d^2) / (sigma sigma_d)^2       (EDM, unit loss at every sigma)
    debias:  1 / sigma                                       (Yu et al. 2024: eps-weight 1 / sqrt(SNR))
    p2:      sigma^-2 / (k + sigma^-2)^gamma                 (perception-prioritized weighting)
    min_snr: min(sigma^-2, gamma)                            (Min-SNR-gamma)
    """
    _check_weighting(weighting)
    snr = sigma.pow(-2)
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    if weighting == "debias":
        return 1 / sigma
    if weighting == "p2":
        return snr / (p2_k + snr) ** p2_gamma
    return snr.clamp(max=min_snr_gamma)


class EDMLoss:
    """Callable loss: (denoiser, images (B,C,H,W), class_labels (B,label_dim) | None) -> loss (B,) float32.

    The denoiser is called as denoiser(noisy_images, sigma (B,), class_labels). Draws sigma then the noise
    from torch's global RNG on the images' device.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 weighting: str = "edm", p2_k: float = 1.0, p2_gamma: float = 1.0,
                 min_snr_gamma: float = 5.0) -> None:
        check_loss_config({"P_mean": P_mean, "P_std": P_std, "sigma_data": sigma_data, "weighting": weighting,
                           "p2_k": p2_k, "p2_gamma": p2_gamma, "min_snr_gamma": min_snr_gamma})
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)
        self.weighting = weighting
        self.p2_k = float(p2_k)
        self.p2_gamma = float(p2_gamma)
        self.min_snr_gamma = float(min_snr_gamma)

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) under this loss's weighting; same shape as sigma."""
        return loss_weight(sigma, self.weighting, sigma_data=self.sigma_data, p2_k=self.p2_k,
                           p2_gamma=self.p2_gamma, min_snr_gamma=self.min_snr_gamma)

    def __call__(self, denoiser: Callable[..., Tensor], images: Tensor,
                 class_labels: Tensor | None) -> Tensor:
        images = images.to(torch.float32)
        batch = images.shape[0]
        sigma = (torch.randn(batch, device=images.device) * self.P_std + self.P_mean).exp()  # ln sigma ~ N
        noise = torch.randn_like(images)
        noisy = images + sigma.reshape(-1, *([1] * (images.ndim - 1))) * noise
        denoised = denoiser(noisy, sigma, class_labels)
        error = (denoised.to(torch.float32) - images).square().flatten(1).mean(dim=1)  # (B,)
        weight = self.weight(sigma)  # (B,)
        return weight * error  # (B,): each sample times its own weight
