"""``counts.csv`` (and the ``counts_matrix_<attribute>.csv`` exports): their one writer and reader.

- ``counts.csv``: tidy, long: columns ``class, <attribute>..., valid, count`` (``counts_columns``) with every
  combination (zeros too), rows in the job's row order (classes in model order, ``uncond`` last). It is made
  from state.json alone (:func:`counts_table`), so a reader can check it against the state.
- ``counts_matrix_<attribute>.csv`` (``export_matrix: wide``): class x value, valid and invalid summed, with a
  header; ``export_matrix: seed`` writes the seed's layout instead: no header, no class column, the K value
  columns then an all-zero legacy column last, rows = classes then the unconditional row (so the seed's
  rho = trace(M[:K, :K]) / sum of the K class rows reads it as written).

Torch-free (the report reads these files).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from biasamp.atomic import atomic_write_text
from biasamp.counting.state import CountState
from biasamp.errors import UsageError

COUNTS_NAME = "counts.csv"
CLASS_COLUMN, VALID_COLUMN, COUNT_COLUMN = "class", "valid", "count"
EXPORT_STYLES = ("wide", "seed")


def counts_columns(attributes: Sequence[str]) -> list[str]:
    """The columns of counts.csv for these bias attributes (in the oracle's order)."""
    return [CLASS_COLUMN, *attributes, VALID_COLUMN, COUNT_COLUMN]


def counts_table(state: CountState, rows: Sequence[str], attributes: Sequence[str],
                 value_names: Sequence[Sequence[str]]) -> pd.DataFrame:
    """The tidy counts of ``rows`` (in that order) as a DataFrame in the counts.csv layout."""
    records = []
    for row in rows:
        counts = state.row(row)
        for combo in itertools.product(*[range(len(v)) for v in value_names], (0, 1)):
            *values, valid = combo
            names = [value_names[i][v] for i, v in enumerate(values)]
            records.append((row, *names, bool(valid), int(counts[combo])))
    return pd.DataFrame.from_records(records, columns=counts_columns(attributes))


def counts_text(table: pd.DataFrame) -> str:
    """counts.csv's exact text for a counts table."""
    return table.to_csv(index=False, lineterminator="\n")


def write_counts(folder: Path, table: pd.DataFrame) -> None:
    atomic_write_text(Path(folder) / COUNTS_NAME, counts_text(table))


def read_counts(folder: Path, attributes: Sequence[str]) -> pd.DataFrame:
    """counts.csv of a job folder: every column as text but ``count`` (int64). UsageError, naming the file, for
    missing columns or counts that are not whole numbers."""
    path = Path(folder) / COUNTS_NAME
    try:
        counts = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty; rerun that count job to write it again") from None
    expected = counts_columns(attributes)
    if list(counts.columns) != expected:
        raise UsageError(f"{path} has columns {list(counts.columns)}, expected {expected}; rerun that count job to "
                         "write it again")
    try:
        counts[COUNT_COLUMN] = counts[COUNT_COLUMN].astype(np.int64)
    except ValueError:
        raise UsageError(f"{path}: column count must hold whole numbers; rerun that count job to write it "
                         "again") from None
    return counts


def matrix(table: pd.DataFrame, attribute: str, rows: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Class x value counts of one attribute (valid and invalid summed, other attributes marginalised)."""
    wide = table.groupby([CLASS_COLUMN, attribute], sort=False)[COUNT_COLUMN].sum().unstack(attribute)
    return wide.reindex(index=list(rows), columns=list(values)).fillna(0).astype(np.int64)


def matrix_path(folder: Path, attribute: str) -> Path:
    return Path(folder) / f"counts_matrix_{attribute}.csv"


def write_matrices(folder: Path, table: pd.DataFrame, attributes: Sequence[str],
                   value_names: Sequence[Sequence[str]], rows: Sequence[str], style: str) -> list[Path]:
    paths = []
    for attribute, values in zip(attributes, value_names, strict=True):
        m = matrix(table, attribute, rows, values)
        path = matrix_path(folder, attribute)
        if style == "wide":
            text = m.rename_axis(index=CLASS_COLUMN, columns=None).to_csv(lineterminator="\n")
        else:  # the seed's layout: no header, the value columns then a legacy all-zero last column, uncond row last
            seed = m.copy()
            seed["legacy"] = 0
            buf = io.StringIO()
            seed.to_csv(buf, header=False, index=False, lineterminator="\n")
            text = buf.getvalue()
        atomic_write_text(path, text)
        paths.append(path)
    return paths
