"""Multi-Color MNIST (after DebiAN, Li et al. 2022): white MNIST digits whose background is split into a left
and a right half, each coloured by its own palette colour, so every image carries two bias attributes.

Each attribute is correlated with the digit on its own: a share ``rho_left`` of class c's images has the left
half in c's palette colour (aligned for ``left``) and, independently, a share ``rho_right`` has the right half
in c's colour. A typical study sets them apart, e.g. rho_left 0.99 and rho_right 0.95, and asks which bias
the diffusion model amplifies more.

Construction, per class c in ``classes_to_use`` order, with one ``numpy.random.Generator`` seeded by ``seed``
(the Biased MNIST rules of :mod:`biasamp.data.biased_mnist`, applied once per half):

1. shuffle c's indices in the source split; keep the first ``class_size`` if given (n of them);
2. left: ``assign_biases`` with ``floor(n * rho_left_c)`` aligned, in that shuffled order (the first ones
   aligned, the conflicting ones in chunks over the confusing classes' colours);
3. right: the same rule with ``floor(n * rho_right_c)`` aligned, laid along a fresh random permutation of the
   n images, so which images are right-aligned is independent of which are left-aligned.

Both halves use the same palette (value k of either attribute is class k's colour). At 28x28 the left half is
columns 0..13 and the right half columns 14..27; ink (pixel != 0) is white. Then one antialiased resize to
``img_resolution``. Items are ``(image, class_index, biases)`` with ``biases`` an int64 tensor (left, right).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biasamp.data.base import InMemoryBiasDataset
from biasamp.data.biased_mnist import (
    aligned_count,
    assign_biases,
    check_classes,
    check_options,
    class_indices,
    resize_uint8,
)
from biasamp.data.mnist import load_mnist
from biasamp.data.palette import COLOUR_NAMES, PALETTE
from biasamp.data.rho import check_rho, per_class_rho

ATTRIBUTES = ("left", "right")


def colourise_halves(digits: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Digits uint8 (N, H, W) -> uint8 (N, 3, H, W): ink white, background columns < W // 2 in the ``left``
    colour (N, 3) and the other columns in the ``right`` colour."""
    n, h, w = digits.shape
    half = w // 2
    background = np.empty((n, 3, h, w), dtype=np.uint8)
    background[..., :half] = np.asarray(left, dtype=np.uint8)[:, :, None, None]
    background[..., half:] = np.asarray(right, dtype=np.uint8)[:, :, None, None]
    ink = (digits != 0)[:, None, :, :]
    return np.where(ink, np.uint8(255), background).astype(np.uint8, copy=False)


class MultiColorMNIST(InMemoryBiasDataset):
    """MNIST with two independent background-colour biases (left and right halves), each with its own rho.

    Args:
        rho_left, rho_right: aligned share of each half, one float for all classes or one per used class.
        The other arguments are those of :class:`~biasamp.data.biased_mnist.BiasedMNIST` (source, split,
        data_dir, classes_to_use, n_confusing_labels, class_size, img_resolution, seed, download, name).

    Attributes:
        images: uint8 (N, 3, R, R); labels: int64 (N,); biases: int64 (N, 2), the left and right colour index
        (index k = class k's colour). ``bias_attributes`` is ``["left", "right"]``; ``rho_by_attribute``,
        ``rho_per_class_by_attribute`` and ``n_aligned_by_attribute`` give each attribute's statistics, and
        ``rho_effective``/``n_aligned``/``rho_per_class`` are those of the first attribute (left).
    """

    bias_attributes = list(ATTRIBUTES)

    def __init__(
        self,
        rho_left: float | Sequence[float],
        rho_right: float | Sequence[float],
        source: str = "embedded",
        split: str = "train",
        data_dir: str | Path = "data",
        classes_to_use: Sequence[int] | None = None,
        n_confusing_labels: int | None = None,
        class_size: int | None = None,
        img_resolution: int = 32,
        seed: int = 0,
        download: bool = False,
        name: str = "multicolor_mnist",
    ) -> None:
        rho_left, rho_right, classes_to_use = (v.tolist() if isinstance(v, np.ndarray | torch.Tensor) else v
                                               for v in (rho_left, rho_right, classes_to_use))
        classes = check_classes(classes_to_use)
        num_classes = len(classes)
        rho_left = check_rho(rho_left, "dataset.rho_left", allow_null=False, num_classes=num_classes)
        rho_right = check_rho(rho_right, "dataset.rho_right", allow_null=False, num_classes=num_classes)
        rhos = {"left": per_class_rho(rho_left, num_classes), "right": per_class_rho(rho_right, num_classes)}
        n_confusing = check_options(rhos["left"] + rhos["right"], num_classes, n_confusing_labels, class_size,
                                    img_resolution, seed, download=download)
        digits, digit_labels = load_mnist(source, split, data_dir, download=download)

        rng = np.random.default_rng(int(seed))
        chosen, lefts, rights, class_counts = [], [], [], []
        aligned = {a: [] for a in ATTRIBUTES}
        for k, digit in enumerate(classes):
            indices = class_indices(digit_labels, digit, class_size, rng, where=f"{source}/{split}")
            n = len(indices)
            n_left, n_right = aligned_count(n, rhos["left"][k]), aligned_count(n, rhos["right"][k])
            left = assign_biases(n, n_left, k, num_classes, n_confusing, rng)
            right = np.empty(n, dtype=np.int64)
            right[rng.permutation(n)] = assign_biases(n, n_right, k, num_classes, n_confusing, rng)
            chosen.append(indices)
            lefts.append(left)
            rights.append(right)
            class_counts.append(n)
            aligned["left"].append(n_left)
            aligned["right"].append(n_right)

        order = np.concatenate(chosen)
        biases = np.stack([np.concatenate(lefts), np.concatenate(rights)], axis=1)
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), class_counts)
        palette = PALETTE[np.asarray(classes)]
        coloured = colourise_halves(digits[order], palette[biases[:, 0]], palette[biases[:, 1]])

        self.images: torch.Tensor = resize_uint8(torch.from_numpy(coloured), int(img_resolution))
        self.labels: torch.Tensor = torch.from_numpy(labels)
        self.biases: torch.Tensor = torch.from_numpy(biases)

        self.name, self.source, self.split, self.seed = name, source, split, int(seed)
        self.classes_to_use: list[int] = classes
        self.class_names: list[str] = [str(d) for d in classes]
        self.bias_names: list[str] = [COLOUR_NAMES[d] for d in classes]
        self.num_classes = self.num_biases = num_classes
        self.in_channels, self.img_resolution = 3, int(img_resolution)
        self.rho_requested = {"left": rho_left, "right": rho_right}
        self.class_counts: list[int] = class_counts
        total = len(labels)
        self.n_aligned_by_attribute = {a: int(sum(aligned[a])) for a in ATTRIBUTES}
        self.rho_by_attribute = {a: self.n_aligned_by_attribute[a] / total if total else 0.0 for a in ATTRIBUTES}
        self.rho_per_class_by_attribute = {
            a: [m / n if n else 0.0 for m, n in zip(aligned[a], class_counts, strict=True)] for a in ATTRIBUTES}
        self.rho_per_class = self.rho_per_class_by_attribute["left"]
        self.n_aligned = self.n_aligned_by_attribute["left"]
        self.n_conflicting = total - self.n_aligned
        self.rho_effective = self.rho_by_attribute["left"]

