"""BFFHQ (biased FFHQ, from Lee et al. 2021, "Learning Debiased Representation via Disentangled Feature
Augmentation"): faces with age as the class and gender as the bias.

Layout under ``<data_dir>/bffhq/``::

    0.5pct/align/<class>/<id>_<y>_<z>.png      training set, bias-aligned (y == z)
    0.5pct/conflict/<class>/<id>_<y>_<z>.png   training set, bias-conflicting (y != z)
    valid/<id>_<y>_<z>.png
    test/<id>_<y>_<z>.png

y = age (0 young, 1 old) is the class, z = gender (0 female, 1 male) the bias; aligned pairs are
(0, 0) and (1, 1). Image files (png, jpg, jpeg, bmp, webp) whose names do not parse, or whose folder
contradicts their name, are dropped and reported like unreadable ones; other files are ignored.
``split``: ``pooled`` (0.5pct + valid + test), ``train`` (0.5pct), ``valid`` or ``test``; ``rho=None``
keeps the files as they are, a number resamples with :func:`biasamp.data.resample.rho_resample`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from biasamp.data.images import InMemoryImageDataset, check_common, load_images, not_found
from biasamp.data.rho import check_rho
from biasamp.errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SPLIT_FOLDERS = {"train": ["0.5pct"], "valid": ["valid"], "test": ["test"], "pooled": ["0.5pct", "valid", "test"]}
NAME_RE = re.compile(r"^(?P<id>.+)_(?P<y>\d+)_(?P<z>\d+)\.[A-Za-z]+$")


def parse_name(path: Path) -> tuple[int, int] | str:
    """(class y, bias z) from ``<id>_<y>_<z>.<ext>``, or the reason the file cannot be used."""
    match = NAME_RE.match(path.name)
    if match is None:
        return "name does not parse as <id>_<y>_<z>.<ext>"
    y, z = int(match["y"]), int(match["z"])
    if y not in (0, 1) or z not in (0, 1):
        return f"y={y}, z={z} in the name; allowed 0 or 1"
    parts = path.parts
    if len(parts) >= 3 and parts[-3] in ("align", "conflict"):
        if parts[-2] != str(y):
            return f"in class folder {parts[-2]!r} but the name says y={y}"
        if (parts[-3] == "align") != (y == z):
            return f"in {parts[-3]}/ but the name says y={y}, z={z}"
    return y, z


def list_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden ones skipped), sorted for determinism."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


class BFFHQ(InMemoryImageDataset):
    """BFFHQ with classes ``["young", "old"]`` (age) and bias ``["female", "male"]`` (gender).

    Args:
        data_dir: root holding ``bffhq/``.
        rho: aligned fraction in [0, 1] after resampling, or ``None`` to keep the files as they are.
        split: ``pooled``, ``train`` (the 0.5pct folder), ``valid`` or ``test``.
        img_resolution: output side R in pixels (centre crop, antialiased resize).
        seed: seeds the resampling.
        name: dataset name recorded in :meth:`summary`.
        on_error: ``skip`` (drop unusable files, report them) or ``raise``.
    """

    class_names = ["young", "old"]
    bias_names = ["female", "male"]
    bias_attributes = ["gender"]

    def __init__(
        self,
        data_dir: str | Path,
        rho: float | None,
        split: str = "pooled",
        img_resolution: int = 64,
        seed: int = 0,
        name: str = "bffhq",
        on_error: str = "skip",
    ) -> None:
        rho = check_rho(rho, "dataset.rho", allow_null=True)
        check_common(split, list(SPLIT_FOLDERS), img_resolution, seed, on_error)
        root = Path(data_dir) / "bffhq"
        files: list[Path] = []
        for sub in SPLIT_FOLDERS[split]:
            folder = root / sub
            if not folder.is_dir():
                raise not_found(f"BFFHQ folder {sub}/", folder, "bffhq", data_dir)
            files += list_files(folder)

        parsed = [parse_name(p) for p in files]
        dropped = [(str(p), r) for p, r in zip(files, parsed, strict=True) if isinstance(r, str)]
        if dropped and on_error == "raise":
            path, reason = dropped[0]
            raise UsageError(f"{path}: {reason} (dataset.on_error=raise)")
        named = [(p, r) for p, r in zip(files, parsed, strict=True) if not isinstance(r, str)]
        if not named:
            raise UsageError(f"no usable image files under {', '.join(str(root / s) for s in SPLIT_FOLDERS[split])}")
        images, kept, unreadable = load_images([p for p, _ in named], int(img_resolution), on_error)
        labels = np.array([yz[0] for _, yz in named], dtype=np.int64)[kept]
        biases = np.array([yz[1] for _, yz in named], dtype=np.int64)[kept]
        files = np.array([str(p) for p, _ in named], dtype=object)[kept]

        self._store(images, labels, biases, files, dropped + unreadable, name=name, split=split, source=str(root),
                    seed=seed, rho=rho)
