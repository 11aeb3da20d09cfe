"""Shared pieces of the real image datasets (Waterbirds, BFFHQ): decoding files into one uint8 tensor,
reporting files that could not be used, and the in-memory dataset base class.

Decoding: PIL, converted to RGB, centre-cropped to a square (the shorter side), then resized to
``img_resolution`` with PIL's antialiased bilinear filter; stored as uint8 (N, 3, R, R). Items are served
in [-1, 1] (``x / 127.5 - 1``), never with ImageNet statistics.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from biasamp.data.base import InMemoryBiasDataset
from biasamp.data.resample import rho_resample
from biasamp.errors import UsageError, one_line

ON_ERROR = ("skip", "raise")
N_DROPPED_SHOWN = 5  # how many dropped file names summary() and the warning line show


def check_common(split: str, splits: Sequence[str], img_resolution: object, seed: object, on_error: str) -> None:
    """UsageError naming the dataset key for a bad split, img_resolution, seed or on_error."""
    if split not in splits:
        raise UsageError(f"dataset.split={split!r}; allowed: {', '.join(splits)}")
    for key, value in (("img_resolution", img_resolution), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise UsageError(f"dataset.{key}={value!r}; allowed: an int")
    if img_resolution < 1:
        raise UsageError(f"dataset.img_resolution={img_resolution!r}; allowed: a positive int")
    if on_error not in ON_ERROR:
        raise UsageError(f"dataset.on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")


def not_found(what: str, path: Path, name: str, data_dir: str | Path) -> UsageError:
    """The error for missing data: the exact expected path and the command that prepares it."""
    return UsageError(
        f"{what} not found: expected {path} (dataset.data_dir={data_dir}). "
        f"Run `python -m biasamp.data.prepare {name} --data-dir {data_dir}` (see docs/datasets.md)."
    )


def decode_image(path: str | Path, img_resolution: int) -> np.ndarray:
    """One file as uint8 (3, R, R): RGB, centre crop to a square, antialiased bilinear resize."""
    with Image.open(path) as image:
        image = image.convert("RGB")  # forces the full decode: truncated files raise here
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != img_resolution:
        image = image.resize((img_resolution, img_resolution), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(image, dtype=np.uint8).transpose(2, 0, 1)


def _try_decode(path: str | Path, img_resolution: int) -> np.ndarray | str:
    try:
        return decode_image(path, img_resolution)
    except FileNotFoundError:
        return "missing file"
    except Exception as err:  # noqa: BLE001 - any decoding failure makes the file unusable
        return f"unreadable ({type(err).__name__}: {one_line(str(err))})"


def load_images(
    paths: Sequence[str | Path], img_resolution: int, on_error: str = "skip"
) -> tuple[torch.Tensor, np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` (in a thread pool) to uint8 (M, 3, R, R), keeping the files that decode.

    Returns the images of the kept files (in ``paths`` order), a bool mask over ``paths`` of the kept
    ones and ``(path, reason)`` for each dropped one. ``on_error="raise"``: a UsageError naming the first
    bad file instead.
    """
    if on_error not in ON_ERROR:
        raise UsageError(f"dataset.on_error={on_error!r}; allowed: {', '.join(ON_ERROR)}")
    workers = max(1, min(16, os.cpu_count() or 1))
    if len(paths) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda p: _try_decode(p, img_resolution), paths, chunksize=16))
    else:
        results = [_try_decode(p, img_resolution) for p in paths]
    kept = np.array([not isinstance(r, str) for r in results], dtype=bool)
    dropped = [(str(p), r) for p, r in zip(paths, results, strict=True) if isinstance(r, str)]
    if dropped and on_error == "raise":
        path, reason = dropped[0]
        raise UsageError(f"{path}: {reason} (dataset.on_error=raise; on_error=skip drops such files and reports them)")
    images = torch.empty((int(kept.sum()), 3, img_resolution, img_resolution), dtype=torch.uint8)
    for i, array in enumerate(r for r in results if not isinstance(r, str)):
        images[i] = torch.from_numpy(array)
    return images, kept, dropped


def warn_dropped(name: str, dropped: Sequence[tuple[str, str]]) -> None:
    """One stderr line saying how many files were dropped and which (the first few)."""
    if not dropped:
        return
    shown = "; ".join(f"{path} ({reason})" for path, reason in dropped[:N_DROPPED_SHOWN])
    more = f"; and {len(dropped) - N_DROPPED_SHOWN} more" if len(dropped) > N_DROPPED_SHOWN else ""
    print(f"biasamp.data: warning: {name}: dropped {len(dropped)} file(s) that could not be used: {shown}{more}",
          file=sys.stderr)


class InMemoryImageDataset(InMemoryBiasDataset):
    """Base of the real datasets: uint8 images, class labels and bias values held in memory.

    Subclasses set ``class_names``, ``bias_names`` and ``bias_attributes`` as class attributes and call
    :meth:`_store` at the end of ``__init__``. ``files`` is the source file of each stored sample; ``dropped``
    the ``(path, reason)`` of each file that could not be used.
    """

    name: str
    split: str
    source: str
    seed: int
    rho_requested: float | None
    class_names: list[str]
    bias_names: list[str]

    def _store(self, images: torch.Tensor, labels: np.ndarray, biases: np.ndarray, files: np.ndarray,
               dropped: Sequence[tuple[str, str]], *, name: str, split: str, source: str, seed: int,
               rho: float | None) -> None:
        """Keep the loaded samples, first resampled to ``rho`` (seeded by ``seed``) when it is set."""
        self.name, self.split, self.source, self.seed, self.rho_requested = name, split, source, int(seed), rho
        if self.rho_requested is not None:
            index = rho_resample(labels, biases, self.rho_requested, self.seed, num_classes=len(self.class_names))
            images, labels, biases, files = images[torch.from_numpy(index)], labels[index], biases[index], files[index]
        self.images: torch.Tensor = images.contiguous()
        self.labels: torch.Tensor = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.biases: torch.Tensor = torch.as_tensor(np.asarray(biases, dtype=np.int64))
        self.num_classes: int = len(self.class_names)
        self.num_biases: int = len(self.bias_names)
        self.in_channels: int = 3
        self.img_resolution: int = int(images.shape[-1])
        self.class_counts: list[int] = [int((self.labels == k).sum()) for k in range(self.num_classes)]
        aligned = self.labels == self.biases
        self.rho_per_class: list[float] = [
            float(aligned[self.labels == k].sum()) / n if n else 0.0 for k, n in enumerate(self.class_counts)
        ]
        self.n_aligned: int = int(aligned.sum())
        self.n_conflicting: int = len(self.labels) - self.n_aligned
        self.rho_effective: float = self.n_aligned / len(self.labels) if len(self.labels) else 0.0
        self.files: list[str] = [str(f) for f in files]  # source file of each stored sample
        self.dropped: list[tuple[str, str]] = list(dropped)
        self.n_dropped: int = len(self.dropped)
        warn_dropped(self.name, self.dropped)

    def summary(self) -> dict:
        """Plain-Python description (JSON/YAML safe) of what was built, dropped files included."""
        return {
            **super().summary(),
            "n_dropped": self.n_dropped,
            "dropped_files": [f"{path} ({reason})" for path, reason in self.dropped[:N_DROPPED_SHOWN]],
        }
