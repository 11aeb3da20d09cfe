"""The colour oracle for Biased MNIST: the background colour of a generated image, by the seed's rule.

Rule (docs/himyb.md): map the image to [0, 1]; pixels with any channel < 0.7 are background (the digit is
white); take the mean RGB of the background pixels times 255; the bias is the nearest palette colour by
Euclidean distance, among the allowed colours (by default the colours of the model's classes).

Added here: ``confidence`` = 1 - d_nearest / d_second (0: a tie, 1: exactly a palette colour), and a
``valid`` flag, False when the image has no background pixel, when the mean colour is farther than
``max_distance`` (RGB units, 0..255) from every allowed colour, or when its confidence is below
``min_confidence`` (nearly as close to a second colour). Invalid samples are still counted as their nearest
colour, but visibly. Defaults: generated backgrounds sit about 60 from their palette colour (slightly
desaturated, plus noise), so ``max_distance`` is 80; the palette's closest pair (orange, yellow) is only
101.5 apart, so points within 80 of two colours exist, and ``min_confidence`` 0.2 (d_nearest <= 0.8
d_second) rejects them.

Multi-Color MNIST has two attributes, ``left`` and ``right``: the same rule is applied to each half of the
image on its own (``regions=("left", "right")``). The W // 16 columns on either side of the middle are left
out of both halves, since the resize to the model resolution blends the two colours there. A sample is valid
when every region is.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from biasamp.data.palette import COLOUR_NAMES, PALETTE
from biasamp.errors import UsageError
from biasamp.oracles.base import OracleOutput

BACKGROUND_THRESHOLD = 0.7  # a pixel with any channel below this (in [0, 1]) is background


REGIONS = ("colour", "left", "right")  # colour: the whole image; left / right: one half each


def region_columns(width: int, region: str) -> slice:
    """The image columns a region reads: all, or one half without the W // 16 columns next to the middle."""
    if region == "colour":
        return slice(0, width)
    margin = width // 16
    if region == "left":
        return slice(0, width // 2 - margin)
    if region == "right":
        return slice(width - width // 2 + margin, width)
    raise ValueError(f"colour oracle region {region!r} is not known; allowed: {list(REGIONS)}")


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


class ColourOracle:
    """Background colour of (B, 3, H, W) images in [-1, 1] among ``colours`` (palette names, in bias order),
    one attribute per region in ``regions`` (default: the whole image, attribute ``colour``)."""

    confusion = None

    def __init__(self, colours: Sequence[str], max_distance: float = 80.0, min_confidence: float = 0.2,
                 regions: Sequence[str] = ("colour",)) -> None:
        unknown = [c for c in colours if c not in COLOUR_NAMES]
        if unknown or not colours:
            raise UsageError(f"oracle.allowed_colours={list(colours)!r}: unknown colour(s) {unknown}; "
                             f"allowed: {list(COLOUR_NAMES)}")
        if len(set(colours)) != len(colours):
            raise UsageError(f"oracle.allowed_colours={list(colours)!r} has duplicates")
        if not _real(max_distance) or not max_distance > 0:
            raise UsageError(f"oracle.max_distance={max_distance!r} is not allowed: a number > 0 (RGB distance)")
        if not _real(min_confidence) or not 0 <= min_confidence < 1:
            raise UsageError(f"oracle.min_confidence={min_confidence!r} is not allowed: a number in [0, 1)")
        bad = [r for r in regions if r not in REGIONS]
        if bad or not regions or len(set(regions)) != len(regions):
            raise ValueError(f"colour oracle regions {list(regions)!r}: allowed distinct values of {list(REGIONS)}")
        self.attributes = list(regions)
        self.min_confidence = float(min_confidence)
        self.value_names = [list(colours) for _ in regions]
        self.max_distance = float(max_distance)
        rgb = PALETTE[[COLOUR_NAMES.index(c) for c in colours]]
        self.palette = torch.as_tensor(rgb, dtype=torch.float32)  # (V, 3), 0..255

    def to(self, device: torch.device | str) -> ColourOracle:
        self.palette = self.palette.to(device)
        return self

    def background_rgb(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean background colour (B, 3) in 0..255, and whether the image had any background pixel (B,)."""
        x = (images.float().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1]
        background = (x < BACKGROUND_THRESHOLD).any(dim=1, keepdim=True)  # (B, 1, H, W)
        n_background = background.sum(dim=(1, 2, 3))
        mean = (x * background).sum(dim=(2, 3)) / n_background.clamp(min=1).unsqueeze(1)
        # no background pixel at all: use the mean of the whole image (and mark the sample invalid)
        mean = torch.where(n_background.unsqueeze(1) > 0, mean, x.mean(dim=(2, 3)))
        return mean * 255.0, n_background > 0

    def _nearest(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(value index, confidence, valid), each (B,), of one region's images."""
        rgb, has_background = self.background_rgb(images)
        palette = self.palette.to(rgb.device)
        dist = torch.cdist(rgb.double(), palette.double())  # (B, V)
        if dist.shape[1] > 1:
            two = dist.topk(2, dim=1, largest=False)
            nearest, d1, d2 = two.indices[:, 0], two.values[:, 0], two.values[:, 1]
            confidence = 1.0 - d1 / d2.clamp(min=1e-12)
        else:
            nearest, d1 = torch.zeros(len(rgb), dtype=torch.long, device=rgb.device), dist[:, 0]
            confidence = torch.ones_like(d1)
        valid = has_background & (d1 <= self.max_distance) & (confidence >= self.min_confidence)
        return nearest, confidence.float(), valid

    def __call__(self, images: Tensor) -> OracleOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the colour oracle needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
        parts = [self._nearest(images[..., region_columns(images.shape[-1], r)]) for r in self.attributes]
        valid = torch.stack([p[2] for p in parts], dim=1).all(dim=1)
        return OracleOutput(bias=torch.stack([p[0] for p in parts], dim=1),
                            confidence=torch.stack([p[1] for p in parts], dim=1), valid=valid)
