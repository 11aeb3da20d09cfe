"""The count job's output files (formats pinned by tests; see DESIGN.md).

- ``counts.csv``: tidy, long: ``class, <attribute>..., valid, count`` with every combination (zeros too),
  classes in model order and ``uncond`` last.
- ``counts_matrix_<attribute>.csv`` (``export_matrix: wide``): class x value, valid and invalid summed, with a
  header; ``export_matrix: seed`` writes the seed's layout instead: no header, no class column, a leading
  all-zero column, rows = classes then the unconditional row.
- ``meta.json``: checkpoint and sha256, rho_data, dataset, sampler and guidance, n per class, seed and index
  range, NFE, wall time, images/s, library versions.
- ``results.csv`` (one per sweep folder): one row per (checkpoint, setting, bias attribute) — an
  ``attribute`` column names it (Multi-Color MNIST has ``left`` and ``right``) — updated under a file lock
  and replaced, never duplicated, when a job is rerun.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biasamp.atomic import atomic_write_text
from biasamp.counting.state import CountState

UNCOND = "uncond"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def counts_table(state: CountState, rows: Sequence[str], attributes: Sequence[str],
                 value_names: Sequence[Sequence[str]]) -> pd.DataFrame:
    """The tidy counts of ``rows`` (in that order) as a DataFrame in the counts.csv layout."""
    records = []
    for row in rows:
        counts = state.row(row)
        for combo in itertools.product(*[range(len(v)) for v in value_names], (0, 1)):
            *values, valid = combo
            record = {"class": row}
            record.update({a: value_names[i][v] for i, (a, v) in enumerate(zip(attributes, values, strict=True))})
            record["valid"] = bool(valid)
            record["count"] = int(counts[combo])
            records.append(record)
    return pd.DataFrame.from_records(records, columns=["class", *attributes, "valid", "count"])


def write_counts(folder: Path, table: pd.DataFrame) -> None:
    atomic_write_text(Path(folder) / "counts.csv", table.to_csv(index=False, lineterminator="\n"))


def matrix(table: pd.DataFrame, attribute: str, rows: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Class x value counts of one attribute (valid and invalid summed, other attributes marginalised)."""
    wide = table.groupby(["class", attribute], sort=False)["count"].sum().unstack(attribute)
    return wide.reindex(index=list(rows), columns=list(values)).fillna(0).astype(np.int64)


def write_matrices(folder: Path, table: pd.DataFrame, attributes: Sequence[str],
                   value_names: Sequence[Sequence[str]], rows: Sequence[str], style: str) -> list[Path]:
    paths = []
    for attribute, values in zip(attributes, value_names, strict=True):
        m = matrix(table, attribute, rows, values)
        path = Path(folder) / f"counts_matrix_{attribute}.csv"
        if style == "wide":
            text = m.rename_axis(index="class", columns=None).to_csv(lineterminator="\n")
        else:  # the seed's layout: no header, a legacy all-zero first column, the uncond row last
            seed = m.copy()
            seed.insert(0, "legacy", 0)
            buf = io.StringIO()
            seed.to_csv(buf, header=False, index=False, lineterminator="\n")
            text = buf.getvalue()
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def update_results(results_csv: Path, rows: Sequence[Mapping[str, Any]], key: str = "job_dir") -> None:
    """Put ``rows`` (one job's rows: one per bias attribute) into the sweep's results.csv, replacing every row
    with their ``key`` (under a lock, so parallel jobs of a multirun never lose each other's rows)."""
    results_csv = Path(results_csv)
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    keys = {str(r[key]) for r in rows}
    with open(results_csv.with_name(results_csv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # only empty cells are missing: "null" (guidance_uncond) and the like stay strings
            old = (pd.read_csv(results_csv, keep_default_na=False, na_values=[""]) if results_csv.is_file()
                   else pd.DataFrame())
            if len(old) and key in old.columns:
                old = old[~old[key].astype(str).isin(keys)]
            new = pd.concat([old, pd.DataFrame([dict(r) for r in rows])], ignore_index=True)
            atomic_write_text(results_csv, new.to_csv(index=False, lineterminator="\n"))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
