"""Waterbirds (Sagawa et al., group DRO): landbirds and waterbirds pasted on land or water backgrounds.

Layout: ``<data_dir>/waterbird_complete95_forest2water2/metadata.csv`` plus the JPEG files it lists
(``img_filename``, relative to that folder). Columns used (any order, extra columns ignored):
``img_filename``, ``y`` (class: 0 landbird, 1 waterbird), ``split`` (0 train, 1 val, 2 test) and
``place`` (bias: 0 land, 1 water; aligned = landbird on land, waterbird on water).

``split`` picks rows (``pooled`` = all three); ``rho=None`` keeps them as they are, a number resamples
them with the seed's rule (:func:`biasamp.data.resample.rho_resample`). Files that cannot be decoded
are dropped before resampling (``on_error="skip"``, reported) or stop the build (``on_error="raise"``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biasamp.data.images import InMemoryImageDataset, check_common, load_images, not_found
from biasamp.data.rho import check_rho
from biasamp.errors import UsageError, one_line

FOLDER = "waterbird_complete95_forest2water2"
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
SPLITS = {"pooled": None, "train": 0, "val": 1, "test": 2}
ALLOWED_VALUES = {"y": (0, 1), "split": (0, 1, 2), "place": (0, 1)}


def read_metadata(path: Path) -> pd.DataFrame:
    """metadata.csv with the required columns checked and y/split/place as int64; UsageError naming the file
    and the column otherwise."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not a readable CSV file ({one_line(str(err))}); replace it with the "
                         "metadata.csv of the Waterbirds release (docs/datasets.md)") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UsageError(
            f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)} "
            f"(found: {', '.join(table.columns)})"
        )
    for column, allowed in ALLOWED_VALUES.items():
        raw = table[column].str.strip()
        numbers = pd.to_numeric(raw, errors="coerce")
        bad = sorted(set(raw[~numbers.isin(allowed)]))
        if bad:
            raise UsageError(
                f"{path}: column {column!r} has value(s) {bad[:10]} outside {list(allowed)}"
            )
        table[column] = numbers.astype(np.int64)
    return table


class Waterbirds(InMemoryImageDataset):
    """Waterbirds with classes ``["landbird", "waterbird"]`` and bias ``place`` ``["land", "water"]``.

    Args:
        data_dir: root holding ``waterbird_complete95_forest2water2/``.
        rho: aligned fraction in [0, 1] after resampling, or ``None`` to keep the split as it is.
        split: ``pooled`` (train + val + test), ``train``, ``val`` or ``test``.
        img_resolution: output side R in pixels (centre crop, antialiased resize).
        seed: seeds the resampling.
        name: dataset name recorded in :meth:`summary`.
        on_error: ``skip`` (drop unreadable files, report them) or ``raise``.
    """

    class_names = ["landbird", "waterbird"]
    bias_names = ["land", "water"]
    bias_attributes = ["place"]

    def __init__(
        self,
        data_dir: str | Path,
        rho: float | None,
        split: str = "pooled",
        img_resolution: int = 64,
        seed: int = 0,
        name: str = "waterbirds",
        on_error: str = "skip",
    ) -> None:
        rho = check_rho(rho, "dataset.rho", allow_null=True)
        check_common(split, list(SPLITS), img_resolution, seed, on_error)
        root = Path(data_dir) / FOLDER
        metadata = root / "metadata.csv"
        if not metadata.is_file():
            raise not_found("Waterbirds metadata", metadata, "waterbirds", data_dir)
        table = read_metadata(metadata)
        if SPLITS[split] is not None:
            table = table[table["split"] == SPLITS[split]]
        if table.empty:
            raise UsageError(f"{metadata}: no rows for dataset.split={split!r}")

        paths = [root / f for f in table["img_filename"].str.strip()]
        images, kept, dropped = load_images(paths, int(img_resolution), on_error)
        labels = table["y"].to_numpy()[kept]
        biases = table["place"].to_numpy()[kept]
        files = np.array([str(p) for p in paths], dtype=object)[kept]

        self._store(images, labels, biases, files, dropped, name=name, split=split, source=str(root), seed=seed,
                    rho=rho)

