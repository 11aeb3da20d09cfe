"""Noise-level (sigma) schedules: decreasing float64 tensors that end at sigma = 0.

sigma is the noise standard deviation in image units (images in [-1, 1]), as in EDM's D(x; sigma).
"""

from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM time steps (Karras et al. 2022, eq. 5), float64 (num_steps + 1,), decreasing, last entry 0.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0..N-1, t_N = 0.
    num_steps == 1 gives [sigma_max, 0].
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is not allowed: must be an integer >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: need 0 < sigma_min < sigma_max")
    if not rho > 0:
        raise ValueError(f"rho={rho!r} is not allowed: must be > 0")
    n = int(num_steps)
    if n == 1:
        return torch.tensor([float(sigma_max), 0.0], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    max_inv_rho, min_inv_rho = float(sigma_max) ** (1 / rho), float(sigma_min) ** (1 / rho)
    steps = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho  # EDM eq. 5
    steps[0], steps[-1] = float(sigma_max), float(sigma_min)  # the endpoints exactly, without pow round-off
    return torch.cat([steps, steps.new_zeros(1)])


def skip_steps(sigmas: Tensor, n_skipped_steps: int) -> Tensor:
    """Drop t_1..t_n from a schedule (keep t_0, then t_{n+1}..t_N): the seed's ``n_skipped_steps``.

    sigmas: (N + 1,) with N steps; 0 <= n_skipped_steps < N. Returns (N + 1 - n,).
    """
    num_steps = sigmas.shape[0] - 1
    n = n_skipped_steps
    if isinstance(n, bool) or int(n) != n or not 0 <= n < num_steps:
        raise ValueError(f"n_skipped_steps={n!r} is not allowed: must be an integer in [0, num_steps) = "
                         f"[0, {num_steps})")
    return torch.cat([sigmas[:1], sigmas[int(n) + 1:]])


def edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
               n_skipped_steps: int = 0) -> Tensor:
    """The Karras schedule of ``num_steps`` steps with t_1..t_n removed, float64 (num_steps + 1 - n,)."""
    return skip_steps(karras_sigmas(num_steps, sigma_min, sigma_max, rho), n_skipped_steps)
