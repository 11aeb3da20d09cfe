"""``results.csv`` of a sweep folder: one row per (checkpoint, setting, bias attribute); its one writer and reader.

Columns, in this order (``results_columns``): ``HEAD_COLUMNS``, then one ``sampler.<key>`` column per parameter of
the sampler family, then ``SETTING_COLUMNS``, the steering columns (``STEER_COLUMNS``, only for jobs counted with
h-space steering: mode, target label, scale, block size B, temperature, loss, branches, sigma window as JSON, the
heads file's h source and sha256), ``ESTIMATE_COLUMNS``, the class-fidelity columns (``FIDELITY_COLUMNS``, only for
jobs counted with a class oracle) and ``SPEED_COLUMNS``. An ``attribute`` column names the bias attribute (Multi-
Color MNIST has ``left`` and ``right``); ``mitigation`` says what the checkpoint's run did to the biased model (""
for a model trained as usual; e.g. ``invdiff-grouper convex r=0.8 lam=1``); ``train_seed`` and ``train_config`` (the
hash of the training run's identity without its seeds) and ``n_img`` (how far the checkpoint was trained) let the
report find models that differ only by training seed; ``rho_data`` is the class mean of the counted classes'
training shares (as rho_model weighs classes equally); ``precision`` is the resolved one (fp32 | bf16). The file is
updated under a file lock and a job's rows are replaced, never duplicated, when the job is written again. Only empty
cells are missing values: ``null`` (guidance_uncond) stays a string. Torch-free: the report reads it.
"""

from __future__ import annotations

import dataclasses
import fcntl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biasamp.atomic import atomic_write_text
from biasamp.errors import UsageError

RESULTS_NAME = "results.csv"
HEAD_COLUMNS = ("job_dir", "run", "mitigation", "checkpoint", "train_seed", "train_config", "n_img", "dataset",
                "attribute", "rho_data")
SAMPLER_PREFIX = "sampler."
SETTING_COLUMNS = ("guidance", "guidance_uncond", "guidance_interval", "oracle", "oracle_options", "class_oracle",
                   "precision", "seed", "n_per_class")
ESTIMATE_COLUMNS = ("n", "n_aligned", "rho_model", "ci_low", "ci_high", "ci_method", "ci_level", "delta",
                    "n_invalid", "rho_model_valid")
STEER_COLUMNS = ("steer", "steer_target", "steer_scale", "steer_batch", "steer_temperature", "steer_loss",
                 "steer_branches", "steer_window", "steer_heads")
FIDELITY_COLUMNS = ("class_fidelity", "class_fidelity_low", "class_fidelity_high", "class_fidelity_n",
                    "class_fidelity_k")
SPEED_COLUMNS = ("nfe", "images_per_s")
# what a reader needs in every file
REQUIRED_COLUMNS = ("job_dir", "run", "rho_data", "sampler.name", "guidance", "n", "n_aligned")


@dataclass(frozen=True)
class ResultsRow:
    """One row of results.csv (``sampler``: the resolved sampler config; ``fidelity``: the FIDELITY_COLUMNS of a
    job with a class oracle, else None)."""

    job_dir: str
    run: str
    checkpoint: str
    train_seed: int | None  # the seed the checkpoint's run was trained with
    train_config: str  # hash of the run's identity without its seeds ("" when the checkpoint has no identity)
    n_img: int  # training images the checkpoint has seen (replicates are models trained as far)
    dataset: str
    attribute: str
    rho_data: float
    sampler: Mapping[str, Any]
    guidance: float
    guidance_uncond: str
    guidance_interval: str  # JSON list, or "" without an interval
    oracle: str
    oracle_options: str  # JSON of the oracle's resolved options (allowed colours, thresholds, file sha256)
    class_oracle: str  # the class oracle's short name, or ""
    precision: str
    seed: int
    n_per_class: int
    n: int
    n_aligned: int
    rho_model: float
    ci_low: float
    ci_high: float
    ci_method: str
    ci_level: float
    delta: float
    n_invalid: int
    rho_model_valid: float
    nfe: float | None
    images_per_s: float | None
    fidelity: Mapping[str, Any] | None = None
    steering: Mapping[str, Any] | None = None  # STEER_COLUMNS of a steered job (counting.steering), else None
    mitigation: str = ""  # "" for a model trained as usual, else what its run did (counting.outputs.mitigation)

    def record(self) -> dict[str, Any]:
        """The row as {column: value} in results.csv's column order."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        sampler = {f"{SAMPLER_PREFIX}{k}": v for k, v in values.pop("sampler").items()}
        fidelity = dict(values.pop("fidelity") or {})
        steering = dict(values.pop("steering") or {})
        return {**{c: values[c] for c in HEAD_COLUMNS}, **sampler,
                **{c: values[c] for c in SETTING_COLUMNS}, **{c: steering[c] for c in STEER_COLUMNS if c in steering},
                **{c: values[c] for c in ESTIMATE_COLUMNS},
                **{c: fidelity[c] for c in FIDELITY_COLUMNS if c in fidelity},
                **{c: values[c] for c in SPEED_COLUMNS}}


def results_columns(columns: Iterable[str]) -> list[str]:
    """``columns`` in results.csv's order: the declared ones first as declared (sampler.* in place), then any
    other column (from an older or newer writer) in the order given."""
    columns = list(dict.fromkeys(columns))
    sampler = [c for c in columns if c.startswith(SAMPLER_PREFIX)]
    declared = [*HEAD_COLUMNS, *sampler, *SETTING_COLUMNS, *STEER_COLUMNS, *ESTIMATE_COLUMNS, *FIDELITY_COLUMNS,
                *SPEED_COLUMNS]
    return [c for c in declared if c in columns] + [c for c in columns if c not in declared]


# columns read as text whatever they look like: an 8-hex hash such as 123e4567 or 01234567 is not a number
TEXT_COLUMNS = ("job_dir", "run", "mitigation", "checkpoint", "train_config", "dataset", "attribute", "guidance_uncond",
                "guidance_interval", "oracle", "oracle_options", "class_oracle", "precision", "ci_method", "steer",
                "steer_target", "steer_loss", "steer_branches", "steer_window", "steer_heads")


def read_results_csv(path: str | Path) -> pd.DataFrame:
    """results.csv as written (no checks): only empty cells are missing ("null" stays a string); the
    TEXT_COLUMNS stay text."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={c: str for c in TEXT_COLUMNS})


def update_results(results_csv: Path, rows: Sequence[ResultsRow | Mapping[str, Any]], key: str = "job_dir") -> None:
    """Put ``rows`` (one job's rows: one per bias attribute) into the sweep's results.csv, replacing every row
    with their ``key`` (under a lock, so parallel jobs of a multirun never lose each other's rows)."""
    records = [r.record() if isinstance(r, ResultsRow) else dict(r) for r in rows]
    results_csv = Path(results_csv)
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    keys = {str(r[key]) for r in records}
    with open(results_csv.with_name(results_csv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = read_results_csv(results_csv) if results_csv.is_file() else pd.DataFrame()
            if len(old) and key in old.columns:
                old = old[~old[key].astype(str).isin(keys)]
            new = pd.concat([old, pd.DataFrame(records)], ignore_index=True)
            new = new[results_columns(new.columns)]
            atomic_write_text(results_csv, new.to_csv(index=False, lineterminator="\n"))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def job_rows(results_csv: Path, job_dir: str) -> pd.DataFrame:
    """The rows of one job in a sweep's results.csv (none when the file is missing or unreadable)."""
    try:
        frame = read_results_csv(results_csv)
    except (FileNotFoundError, pd.errors.EmptyDataError, pd.errors.ParserError):
        return pd.DataFrame()
    return frame[frame["job_dir"].astype(str) == job_dir] if "job_dir" in frame.columns else pd.DataFrame()


def read_results(path: str | Path) -> pd.DataFrame:
    """A sweep's results.csv, checked: UsageError naming the file when it is empty, lacks a required column, has
    no rows, or its n / n_aligned are not whole numbers with 0 <= n_aligned <= n."""
    path = Path(path)
    redo = "rerun biasamp.count for this sweep"
    try:
        frame = read_results_csv(path)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty; {redo}") from None
    except pd.errors.ParserError as err:
        raise UsageError(f"{path} is not a CSV file ({str(err).strip()}); {redo}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} lacks column(s) {missing}: it was not written by biasamp.count; {redo}")
    if frame.empty:
        raise UsageError(f"{path} has no rows; {redo}")
    for col in ("n", "n_aligned"):
        numbers = pd.to_numeric(frame[col], errors="coerce")
        bad = numbers.isna() | (numbers % 1 != 0)
        if bad.any():
            raise UsageError(f"{path}: column {col} must hold whole numbers (job {frame['job_dir'][bad].iloc[0]}); "
                             f"{redo}")
        frame[col] = numbers.astype("int64")
    wrong = (frame["n_aligned"] < 0) | (frame["n_aligned"] > frame["n"])
    if wrong.any():
        raise UsageError(f"{path}: job {frame['job_dir'][wrong].iloc[0]} has n_aligned outside [0, n]; {redo}")
    return frame
