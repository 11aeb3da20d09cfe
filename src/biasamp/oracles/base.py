"""The oracle interface: generated images in [-1, 1] -> one bias value per attribute, per sample.

An oracle names its attributes (the bias columns of counts.csv, e.g. ``colour``; Multi-Color MNIST has two)
and, for each, the ordered value names; bias value k of attribute a is *aligned* with class k. It returns,
per sample: the predicted value index of each attribute, a confidence in [0, 1], and a ``valid`` flag that is
False when the image is too far from anything the oracle knows (such samples are counted, but visibly).
Trained classifier oracles (another issue) implement the same interface and may carry a confusion matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class OracleOutput:
    """bias: int64 (B, A) value index per attribute; confidence: float (B, A); valid: bool (B,)."""

    bias: Tensor
    confidence: Tensor
    valid: Tensor

    def __post_init__(self) -> None:
        if self.bias.ndim != 2 or self.confidence.shape != self.bias.shape or self.valid.shape != self.bias.shape[:1]:
            raise ValueError(f"inconsistent oracle output shapes: bias {tuple(self.bias.shape)}, confidence "
                             f"{tuple(self.confidence.shape)}, valid {tuple(self.valid.shape)}")


class Oracle(Protocol):
    attributes: list[str]  # column names, one per bias attribute
    value_names: list[list[str]]  # per attribute, the names of its values (index k aligned with class k)
    confusion: dict | None  # measured confusion on real data (trained oracles), else None

    def __call__(self, images: Tensor) -> OracleOutput: ...

    def to(self, device: torch.device | str) -> Oracle: ...
