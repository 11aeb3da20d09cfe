"""Learning-rate schedules as functions of images seen.

Each schedule maps (n_img, total_img) to a factor that multiplies the optimizer's base lr. Configs pick
one by ``_target_``; the LightningModule turns it into a per-step ``LambdaLR`` with n_img = step * batch_total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    """lr stays at its base value."""

    def __call__(self, n_img: int, total_img: int) -> float:
        return 1.0


@dataclass(frozen=True)
class LinearRampup:
    """EDM: lr * min(n_img / (rampup_kimg * 1000), 1), then constant."""

    rampup_kimg: float = 10000.0

    def __post_init__(self) -> None:
        if self.rampup_kimg < 0:
            raise ValueError(f"lr_schedule.rampup_kimg must be >= 0, got {self.rampup_kimg}")

    def __call__(self, n_img: int, total_img: int) -> float:
        return min(n_img / max(self.rampup_kimg * 1000.0, 1e-8), 1.0)


@dataclass(frozen=True)
class CosineToZero:
    """The seed's schedule: cosine annealing from the base lr to 0 over the whole run, no warm-up."""

    def __call__(self, n_img: int, total_img: int) -> float:
        progress = min(n_img / max(total_img, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
