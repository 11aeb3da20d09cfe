"""Count sweeps -> publication tables (CSV, Markdown, LaTeX booktabs).

A count sweep folder (written by ``python -m biasamp.count -m ...``) holds ``results.csv``, one row per
(checkpoint, setting, attribute), and one sub-folder per job (named by the row's ``job_dir``) with
``counts.csv``, ``meta.json`` and ``state.json``, each read through its format module in biasamp.counting
(counts, meta, results, state). A counts.csv that does not match the state.json beside it (a cell edited by
hand) is refused. This module reads one or several sweeps, recomputes every interval with one method and
level, finds the keys that were swept, and writes:

- the results table: swept keys, rho_data, rho_model with its interval, delta = rho_model - rho_data, n, the
  share of samples the oracle could not classify, NFE per sample, and the rho_model corrected for the oracle's
  measured confusion where a job's oracle has one;
- the per-class table: rho per class (its own interval) for every job;
- the seeds table (analysis.seeds) where settings were counted on models that differ only by their training
  seed, and the unconditional table (each bias value's share among the ``uncond`` samples) where jobs have them.

Tables are DataFrames of plain numbers (the CSV files hold them at full precision); the Markdown and LaTeX
writers format them as ``0.912 [0.861, 0.946]`` with a caption that names the settings held fixed.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biasamp.analysis.estimates import per_class_rho
from biasamp.analysis.intervals import check_level, check_method, proportion_interval
from biasamp.atomic import atomic_write_text
from biasamp.counting.counts import COUNTS_NAME, counts_table, counts_text, read_counts
from biasamp.counting.meta import JobMeta, read_meta
from biasamp.counting.results import RESULTS_NAME, STEER_COLUMNS, read_results
from biasamp.counting.state import STATE_NAME, read_state
from biasamp.errors import UsageError

# columns that name a setting, in the order tables and legends list them (other sampler.* go after sampler.eta)
KEY_ORDER = ("rho_data", "train_seed", "mitigation", "run", "train_config", "checkpoint", "dataset", "attribute",
             "sampler.name", "sampler.solver", "sampler.num_steps", "sampler.s_churn", "sampler.order", "sampler.eta")
KEY_ORDER_TAIL = ("guidance", "guidance_uncond", "guidance_interval", *STEER_COLUMNS, "oracle", "oracle_options",
                  "class_oracle", "precision", "seed", "n_per_class", "sweep")
# never shown in a caption: long paths that the run name already stands for
NOT_NOTED = ("checkpoint", "sweep", "train_config", "oracle_options", "steer_heads")  # long JSON, sha256s
TABLE_FORMATS = ("csv", "md", "tex")
METHOD_NAMES = {"clopper_pearson": "Clopper–Pearson", "wilson": "Wilson", "jeffreys": "Jeffreys",
                "bootstrap": "percentile-bootstrap", "t_seeds": "t over training seeds ∪ pooled Clopper–Pearson"}

LABELS_MD = {"rho_data": "ρ_data", "sampler.name": "sampler", "sampler.solver": "solver",
             "sampler.num_steps": "steps", "sampler.s_churn": "S_churn", "sampler.s_min": "S_min",
             "sampler.s_max": "S_max", "sampler.s_noise": "S_noise", "sampler.eta": "η", "sampler.rho": "ρ_sched",
             "sampler.sigma_min": "σ_min", "sampler.sigma_max": "σ_max", "guidance": "w",
             "guidance_uncond": "uncond. branch", "guidance_interval": "guidance interval", "n_per_class": "n/class",
             "class_rho_data": "ρ_data (class)",
             "rho_model": "ρ_model", "rho": "ρ", "rho_corrected": "ρ_corrected", "delta": "Δ", "n": "n",
             "invalid_frac": "invalid", "nfe": "NFE", "class": "class", "class_fidelity": "class fidelity",
             "class_oracle": "class oracle", "oracle_options": "oracle options", "train_seed": "training seed",
             "train_config": "training config", "train_seeds": "training seeds", "n_seeds": "seeds",
             "between_sd": "between-seed SD", "per_seed": "ρ_model per seed", "rho_model_valid": "ρ_model (valid)",
             "steer": "steering", "steer_target": "target", "steer_scale": "scale", "steer_batch": "B",
             "steer_temperature": "T", "steer_loss": "loss", "steer_branches": "steered rows",
             "steer_window": "σ window", "steer_heads": "heads", "target_aligned": "target (aligned)",
             "fd": "FD", "fd_reference": "FD to", "bias": "Bias", "mitigation": "mitigation"}
LABELS_TEX = {"rho_data": r"$\rho_\mathrm{data}$", "class_rho_data": r"$\rho_\mathrm{data}$ (class)",
              "sampler.s_churn": r"$S_\mathrm{churn}$",
              "sampler.s_min": r"$S_\mathrm{min}$", "sampler.s_max": r"$S_\mathrm{max}$",
              "sampler.s_noise": r"$S_\mathrm{noise}$", "sampler.eta": r"$\eta$",
              "sampler.rho": r"$\rho_\mathrm{sched}$",
              "sampler.sigma_min": r"$\sigma_\mathrm{min}$", "sampler.sigma_max": r"$\sigma_\mathrm{max}$",
              "guidance": r"$w$", "rho_model": r"$\rho_\mathrm{model}$", "rho": r"$\rho$",
              "rho_corrected": r"$\rho_\mathrm{corrected}$", "delta": r"$\Delta$", "n": r"$n$",
              "per_seed": r"$\rho_\mathrm{model}$ per seed", "rho_model_valid": r"$\rho_\mathrm{model}$ (valid)"}
# a point estimate and the columns of its interval
INTERVALS = {"rho_model": ("ci_low", "ci_high"), "rho": ("ci_low", "ci_high"),
             "rho_corrected": ("rho_corrected_low", "rho_corrected_high"),
             "class_fidelity": ("class_fidelity_low", "class_fidelity_high"), "fd": ("fd_low", "fd_high"),
             "bias": ("bias_low", "bias_high")}
# kept in the CSV, left out of Markdown/LaTeX
HIDDEN_IN_TEXT = ("n_aligned", "n_invalid", "ci_method", "ci_level", "sweep", "job_dir", "delta_low", "delta_high",
                  "rho_model_valid", "rho_min", "rho_max")
MISSING_MD, MISSING_TEX = "–", "--"


# ------------------------------------------------------------------------------------------- loading
def _missing_sweep(path: str | Path, why: str) -> UsageError:
    return UsageError(f"sweep={path}: {why}; run python -m biasamp.count (e.g. -m checkpoint=<ckpt> "
                             "sampler.num_steps=6,18) first and pass its sweep folder")


def expand_sweeps(sweeps: str | Path | Iterable[str | Path]) -> list[Path]:
    """Sweep folders from a path, a glob or a list of them (globs keep only folders that hold results.csv)."""
    items = [sweeps] if isinstance(sweeps, str | Path) else list(sweeps)
    if not items:
        raise _missing_sweep("[]", "no sweep folder given")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        if glob.has_magic(text):
            matches = [Path(p) for p in sorted(glob.glob(text)) if (Path(p) / RESULTS_NAME).is_file()]
            if not matches:
                raise _missing_sweep(item, "no folder matching this pattern holds a results.csv")
            found.extend(matches)
            continue
        path = Path(text)
        if not path.is_dir():
            raise _missing_sweep(item, f"folder {path} does not exist")
        if not (path / RESULTS_NAME).is_file():
            raise _missing_sweep(item, f"{path / RESULTS_NAME} not found (not a count sweep folder)")
        found.append(path)
    unique: list[Path] = []
    for p in (p.resolve() for p in found):
        if p not in unique:
            unique.append(p)
    return unique


def load_results(sweep_dirs: str | Path | Iterable[str | Path], method: str = "clopper_pearson",
                 level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The results.csv rows of every sweep, concatenated, with rho_model, its interval and delta recomputed.

    Adds a ``sweep`` column (the sweep folder, absolute) so each row's job folder is ``sweep / job_dir``.
    ``ci_low``/``ci_high`` come from ``method`` at ``level`` (``n_boot``/``seed``: bootstrap only) over the
    row's ``n`` and ``n_aligned``. Raises UsageError for a missing folder or results.csv, or a results.csv
    that is not as biasamp.count writes it (counting.results.read_results); ``method`` and ``level`` are
    the caller's to check.
    """
    method, level = check_method(method), check_level(level)
    frames = []
    for sweep in expand_sweeps(sweep_dirs):
        frame = read_results(sweep / RESULTS_NAME)
        frame.insert(0, "sweep", str(sweep))
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True, sort=False)
    df["n"] = df["n"].astype(np.int64)
    df["n_aligned"] = df["n_aligned"].astype(np.int64)
    bounds = [proportion_interval(int(k), int(n), level, method, n_boot=n_boot, seed=seed)
              for k, n in zip(df["n_aligned"], df["n"], strict=True)]
    df["rho_model"] = [k / n if n else math.nan for k, n in zip(df["n_aligned"], df["n"], strict=True)]
    df["ci_low"] = [b[0] for b in bounds]
    df["ci_high"] = [b[1] for b in bounds]
    df["ci_method"] = method
    df["ci_level"] = level
    df["delta"] = df["rho_model"] - df["rho_data"].astype(float)
    if "mitigation" in df.columns:  # "" (a model trained as usual) reads as missing
        df["mitigation"] = df["mitigation"].fillna("none")
    df["delta_low"] = df["ci_low"] - df["rho_data"].astype(float)  # rho_data is exact: the interval shifts
    df["delta_high"] = df["ci_high"] - df["rho_data"].astype(float)
    if "class_fidelity_k" in df:  # jobs counted with a class oracle: the same interval method for fidelity
        for i, (k, n) in enumerate(zip(df["class_fidelity_k"], df["class_fidelity_n"], strict=True)):
            if pd.notna(k) and pd.notna(n) and n > 0:
                low, high = proportion_interval(int(k), int(n), level, method, n_boot=n_boot, seed=seed)
                df.loc[df.index[i], ["class_fidelity", "class_fidelity_low", "class_fidelity_high"]] = [
                    k / n, low, high]
    df.attrs.update(ci_method=method, ci_level=level, n_boot=n_boot, seed=seed)
    return df


@dataclass(frozen=True)
class Job:
    """One count job's files: its counts (counts.csv, all columns as text but ``count``) and meta.json."""

    folder: Path
    counts: pd.DataFrame
    meta: JobMeta
    rho_attribute: str | None = None  # the bias attribute of the results row (None: the oracle's first)

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.meta.class_names]

    @property
    def attribute(self) -> str:
        return self.rho_attribute or self.meta.attributes[0]

    @property
    def value_names(self) -> list[str]:
        return self.meta.value_names[self.meta.attributes.index(self.attribute)]

    @property
    def confusion(self) -> dict[str, Any] | None:
        """The oracle's measured confusion for the rho attribute, or None: ``{labels, counts}`` pooled over the
        classes, with ``per_class`` ({class name: counts}) where the oracle stored it (corrected_rho reads both)."""
        confusion = self.meta.oracle.get("confusion")
        return confusion.get(self.attribute) if isinstance(confusion, dict) else None


def load_job(row: pd.Series) -> Job:
    """The job folder of one results row (``sweep / job_dir``); UsageError if its files are missing."""
    folder = Path(row["sweep"]) / str(row["job_dir"])
    for name in (COUNTS_NAME, "meta.json", STATE_NAME):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} not found: results.csv names job {row['job_dir']} but its files are "
                             "missing; rerun that count job")
    attribute = row.get("attribute")
    return _read_job(folder, None if _is_missing(attribute) else str(attribute))


def _read_job(folder: Path, attribute: str | None = None) -> Job:
    """Read and check a job folder's meta.json, counts.csv and state.json: UsageError naming the file when one
    is not as biasamp.count writes it, or when counts.csv does not hold the counts of state.json."""
    meta = read_meta(folder)
    attributes, values = meta.attributes, meta.value_names
    counts = read_counts(folder, attributes)
    if attribute is not None and attribute not in attributes:
        raise UsageError(f"results.csv names attribute {attribute!r} for {folder.name}, but its oracle has "
                         f"{attributes}; rerun that count job")
    state = read_state(folder)
    shape = (*[len(v) for v in values], 2)
    if state is None or tuple(state.shape) != shape:
        raise UsageError(f"{folder / STATE_NAME} is missing or does not fit meta.json's oracle values {values}; rerun "
                         "that count job")
    rows = meta.row_names or list(dict.fromkeys(counts["class"]))
    if (folder / COUNTS_NAME).read_text() != counts_text(counts_table(state, rows, attributes, values)):
        raise UsageError(f"{folder / COUNTS_NAME} does not hold the counts of {STATE_NAME} beside it (edited by "
                         "hand?); rerun that count job (python -m biasamp.count with its settings) to rewrite it from "
                         f"{STATE_NAME}")
    return Job(folder, counts, meta, attribute)


# ------------------------------------------------------------------------------------------- swept keys
def candidate_keys(df: pd.DataFrame) -> list[str]:
    """Columns of ``df`` that name a setting, in display order."""
    head = [k for k in KEY_ORDER if k in df.columns]
    others = sorted(c for c in df.columns if c.startswith("sampler.") and c not in KEY_ORDER)
    tail = [k for k in KEY_ORDER_TAIL if k in df.columns]
    return head + others + tail


def _distinct(col: pd.Series) -> int:
    return int(col.astype(object).where(col.notna(), None).nunique(dropna=False))


def _determined(df: pd.DataFrame, by: Sequence[str], key: str) -> bool:
    """True when ``key`` takes one value (missing counts as one) within every group of ``by``."""
    if not by:
        return _distinct(df[key]) <= 1
    groups = df.assign(_k=df[key].astype(object).where(df[key].notna(), "<missing>"))
    return bool(groups.groupby(list(by), dropna=False, sort=False)["_k"].nunique().max() <= 1)


def swept_keys(df: pd.DataFrame, first: Sequence[str] = ("rho_data",)) -> list[str]:
    """The setting keys that vary, each one not already fixed by the keys before it.

    Keys are tried in ``first`` then display order; a key is kept when it varies over ``df`` and is not a
    function of the keys kept so far. So a sweep over two samplers keeps ``sampler.name`` and drops
    ``sampler.solver`` when only one sampler has a solver, and the run name goes when rho_data tells runs apart.
    ``attribute`` is kept whenever it varies: a job's rows differ by nothing else.
    """
    order = [k for k in first if k in df.columns] + [k for k in candidate_keys(df) if k not in first]
    kept: list[str] = []
    for key in order:
        if _distinct(df[key]) > 1 and (key == "attribute" or not _determined(df, kept, key)):
            kept.append(key)
    return kept


def _fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else f"{float(value):g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def fixed_settings(df: pd.DataFrame, keys: Sequence[str]) -> list[tuple[str, str]]:
    """(key, text) for every setting key not in ``keys``: its value, with the samplers it applies to when
    other samplers lack it, or the values it takes with the swept keys."""
    notes = []
    has_name = "sampler.name" in df.columns
    for key in candidate_keys(df):
        if key in keys or key in NOT_NOTED or key == "rho_data":
            continue
        present = df[key].notna()
        values = list(dict.fromkeys(_fmt_value(v) for v in df.loc[present, key]))
        if not values:
            continue
        text = ", ".join(values[:6]) + (", …" if len(values) > 6 else "")
        if len(values) == 1 and not present.all() and has_name and key.startswith("sampler."):
            names = ", ".join(dict.fromkeys(str(v) for v in df.loc[present, "sampler.name"]))
            text = f"{text} ({names})"
        elif len(values) > 1:
            text = f"{{{text}}} (varies with the swept keys)"
        notes.append((key, text))
    return notes


# ------------------------------------------------------------------------------------------- tables
@functools.lru_cache(maxsize=256)
def _correction(folder: str, attribute: str, level: float, n_boot: int, seed: int, confusion: str = "auto"
                ) -> dict[str, Any]:
    """corrected_rho of one job folder's attribute (cached: the results and per-class tables both need it), with
    the job's per-class confusion matrices where its oracle stored them and ``confusion`` allows (auto,
    per_class, pooled); the result's ``confusion`` names the one used."""
    from biasamp.analysis.correction import corrected_rho  # only needed when an oracle has a confusion matrix

    job = _read_job(Path(folder), attribute)
    try:
        return corrected_rho(job.counts, job.class_names, job.value_names, job.attribute, job.confusion,
                             level=level, n_boot=n_boot, seed=seed, confusion=confusion)
    except ValueError as err:  # a confusion in meta.json that does not fit the counts: the job's file, not a bug
        raise UsageError(f"{Path(folder) / 'meta.json'}: the oracle's confusion cannot correct these counts "
                         f"({err}); rerun that count job with an oracle.ckpt written by python -m biasamp.oracle"
                         ) from None


def _confusion_attrs(fits: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The confusion modes the corrections used and auto's notes on falling back to pooled (for the caption)."""
    done = [fit for fit in fits if fit is not None]
    return {"confusion": sorted({fit["confusion"] for fit in done}),
            "confusion_notes": list(dict.fromkeys(fit["confusion_note"] for fit in done if fit["confusion_note"]))}


def _sort(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    by = [k for k in ("rho_data", *keys) if k in df.columns]
    by = list(dict.fromkeys(by))
    return df.sort_values(by, na_position="last", kind="stable").reset_index(drop=True) if by else df


def _caption_attrs(df: pd.DataFrame, keys: Sequence[str], kind: str, corrected: bool) -> dict[str, Any]:
    return {"kind": kind, "keys": list(keys), "fixed": fixed_settings(df, keys), "corrected": corrected,
            "ci_method": df.attrs.get("ci_method", str(df["ci_method"].iloc[0]) if "ci_method" in df else ""),
            "ci_level": float(df.attrs.get("ci_level", df["ci_level"].iloc[0] if "ci_level" in df else 0.95)),
            "n_boot": int(df.attrs.get("n_boot", 2000)), "sweeps": sorted({Path(s).name for s in df["sweep"]})}


def results_table(df: pd.DataFrame, n_boot: int | None = None, seed: int | None = None,
                  confusion: str | None = None) -> pd.DataFrame:
    """One row per (checkpoint, setting): swept keys, rho_data, rho_model, ci_low, ci_high, delta with its interval
    (delta_low, delta_high: rho_model's shifted by the exact rho_data), n, n_aligned, n_invalid, invalid_frac,
    rho_model_valid (among the samples the oracle could classify), nfe, and rho_corrected with its interval when
    any job's oracle has a confusion matrix (NaN for the jobs without one) and ``confusion``: the confusion it
    was corrected with (per_class: each class its own matrix; pooled: one for all).

    ``df`` is load_results' frame; ``n_boot``/``seed`` (default: those given to load_results) serve the
    correction's posterior draws; ``confusion`` (auto | per_class | pooled, default df.attrs' or auto) chooses
    its matrices (corrected_rho). ``attrs`` carries what the writers put in the caption.
    """
    n_boot = int(df.attrs.get("n_boot", 2000) if n_boot is None else n_boot)
    seed = int(df.attrs.get("seed", 0) if seed is None else seed)
    confusion = str(df.attrs.get("confusion", "auto") if confusion is None else confusion)
    level = float(df.attrs.get("ci_level", df["ci_level"].iloc[0]))
    keys = [k for k in swept_keys(df) if k != "rho_data"]
    # rho_data leads when it is swept (rows are grouped by it), else it follows the swept keys
    lead = ["rho_data", *keys] if _distinct(df["rho_data"]) > 1 else [*keys, "rho_data"]
    out = df[[*lead, "rho_model", "ci_low", "ci_high", "delta", "delta_low", "delta_high", "n", "n_aligned"]].copy()
    n_invalid = df["n_invalid"] if "n_invalid" in df else pd.Series(np.nan, index=df.index)
    out["n_invalid"] = n_invalid
    out["invalid_frac"] = [i / n if n else math.nan for i, n in zip(n_invalid, df["n"], strict=True)]
    out["rho_model_valid"] = df["rho_model_valid"] if "rho_model_valid" in df else np.nan
    out["nfe"] = df["nfe"] if "nfe" in df else np.nan
    if "class_fidelity" in df:  # jobs counted with a class oracle (Clopper-Pearson, as the count app wrote it)
        for column in ("class_fidelity", "class_fidelity_low", "class_fidelity_high"):
            out[column] = df[column]
    jobs = [load_job(row) for _, row in df.iterrows()]
    corrected = any(job.confusion is not None for job in jobs)
    if corrected:
        fits = [None if job.confusion is None else _correction(str(job.folder), job.attribute, level, n_boot, seed,
                                                               confusion) for job in jobs]
        for column, field in (("rho_corrected", "rho_corrected"), ("rho_corrected_low", "ci_low"),
                              ("rho_corrected_high", "ci_high")):
            out[column] = [math.nan if fit is None else float(fit[field]) for fit in fits]
        out["confusion"] = [math.nan if fit is None else fit["confusion"] for fit in fits]
    out["ci_method"], out["ci_level"] = df["ci_method"], df["ci_level"]
    out["job_dir"] = df["job_dir"]
    out["sweep"] = df["sweep"]
    out = _sort(out, keys)
    out.attrs.update(_caption_attrs(df, keys, "results", corrected))
    out.attrs.update(_confusion_attrs(fits) if corrected else {})
    out.attrs["n_boot"] = n_boot
    out.attrs["fidelity"] = "class_fidelity" in out
    return out


def per_class_table(df: pd.DataFrame, confusion: str | None = None) -> pd.DataFrame:
    """rho per class for every job: swept keys (rho_data first when it varies), class, class_rho_data (the
    class's own share in the training data when the dataset summary has it, else the job's rho_data), rho,
    ci_low, ci_high, n, n_aligned, and rho_corrected with its interval when any job's oracle has a
    confusion matrix, with ``confusion`` (per_class | pooled, the matrix it was corrected with; chosen by
    ``confusion`` as in results_table); intervals by load_results' method and level. Jobs in the results
    table's order."""
    confusion = str(df.attrs.get("confusion", "auto") if confusion is None else confusion)
    method = str(df.attrs.get("ci_method", df["ci_method"].iloc[0]))
    level = float(df.attrs.get("ci_level", df["ci_level"].iloc[0]))
    n_boot, seed = int(df.attrs.get("n_boot", 2000)), int(df.attrs.get("seed", 0))
    keys = [k for k in swept_keys(df) if k != "rho_data"]
    swept_rho = _distinct(df["rho_data"]) > 1
    rows = list(_sort(df, keys).iterrows())
    jobs = [load_job(row) for _, row in rows]
    corrected = any(job.confusion is not None for job in jobs)
    parts, fits = [], []
    for (_, row), job in zip(rows, jobs, strict=True):
        table = per_class_rho(job.counts, job.class_names, job.value_names, job.attribute, level=level,
                              method=method, n_boot=n_boot, seed=seed)
        summary = job.meta.dataset_summary or {}
        by_attribute = summary.get("rho_per_class_by_attribute") or {}
        own = dict(zip([str(c) for c in summary.get("class_names", [])],
                       by_attribute.get(job.attribute, summary.get("rho_per_class", [])), strict=False))
        table["class_rho_data"] = [float(own.get(c, row["rho_data"])) for c in table["class"]]
        table = table[["class", "class_rho_data", "rho", "ci_low", "ci_high", "n", "n_aligned"]]
        if corrected:
            fit = None if job.confusion is None else _correction(str(job.folder), job.attribute, level, n_boot, seed,
                                                                 confusion)
            fits.append(fit)
            by_class = {d["class"]: d for d in fit["per_class"]} if fit else {}
            for column, field in (("rho_corrected", "rho_corrected"), ("rho_corrected_low", "ci_low"),
                                  ("rho_corrected_high", "ci_high")):
                table[column] = [float(by_class[c][field]) if c in by_class else math.nan for c in table["class"]]
            table["confusion"] = math.nan if fit is None else fit["confusion"]
        for key in reversed(["rho_data", *keys] if swept_rho else keys):
            table.insert(0, key, row[key])
        table["ci_method"], table["ci_level"] = method, level
        table["job_dir"] = row["job_dir"]
        table["sweep"] = row["sweep"]
        parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(_caption_attrs(df, keys, "per_class", corrected))
    out.attrs.update(_confusion_attrs(fits) if corrected else {})
    return out


def steering_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per class of every job of a sweep with h-space steering: the swept keys, class, rho (aligned share) with
    its Clopper-Pearson interval, the target's aligned share, FD = ||p_hat - target||_2 with its interval
    (analysis.steering; unsteered jobs against the uniform distribution) and the invalid share. Empty when no
    job was steered."""
    from biasamp.analysis.steering import fd_rows, has_steering, steering_frame

    if not has_steering(df):
        return pd.DataFrame()
    return _per_class_jobs(steering_frame(df), fd_rows, "steering")


def _per_class_jobs(frame: pd.DataFrame, rows: Callable[[Job, float], list[dict[str, Any]]], kind: str
                    ) -> pd.DataFrame:
    """One block of ``rows(job, level)`` (per-class rows, Clopper-Pearson at the report's level) per job of
    ``frame``, each led by the job's swept keys (rho_data aside) and tagged with its folder; captioned as ``kind``."""
    level = float(frame.attrs.get("ci_level", frame["ci_level"].iloc[0]))
    keys = [k for k in swept_keys(frame) if k != "rho_data"]
    parts = []
    for _, row in _sort(frame, keys).iterrows():
        table = pd.DataFrame(rows(load_job(row), level))
        for key in reversed(keys):
            table.insert(0, key, row[key])
        table["job_dir"], table["sweep"] = row["job_dir"], row["sweep"]
        table["ci_method"], table["ci_level"] = "clopper_pearson", level
        parts.append(table)
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(_caption_attrs(frame, keys, kind, False))
    return out


def has_mitigation(df: pd.DataFrame, prefix: str = "invdiff") -> bool:
    """True when a job of ``df`` counted a model whose run was the ``prefix`` mitigation (the mitigation column)."""
    return "mitigation" in df.columns and bool(df["mitigation"].astype(str).str.startswith(prefix).any())


def bias_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per class of every job, when a job counted an InvDiff model: the swept keys, class, rho with its
    Clopper-Pearson interval, InvDiff's Bias with its interval (analysis.bias_metric.bias_rows, with a ``mean``
    row per job), n and the invalid share. Empty otherwise."""
    from biasamp.analysis.bias_metric import bias_rows

    if not has_mitigation(df):
        return pd.DataFrame()
    return _per_class_jobs(df, bias_rows, "bias")


def seeds_table(df: pd.DataFrame, agg: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per setting counted on models that differ only by their training seed (analysis.seeds): the
    swept keys of those rows, rho_data, rho_model (mean over seeds) with its seed-aggregate interval, delta with
    its interval, between_sd, per_seed, n_seeds, train_seeds, n. Empty when nothing is replicated. ``agg``:
    analysis.seeds.seed_table(df), when the caller has it already."""
    from biasamp.analysis.seeds import seed_table

    agg = seed_table(df) if agg is None else agg
    if agg.empty:
        return agg
    keys = [k for k in swept_keys(agg) if k != "rho_data"]
    lead = ["rho_data", *keys] if _distinct(agg["rho_data"]) > 1 else [*keys, "rho_data"]
    cols = [*lead, "rho_model", "ci_low", "ci_high", "delta", "delta_low", "delta_high", "between_sd", "per_seed",
            "rho_min", "rho_max", "n_seeds", "train_seeds", "n", "n_aligned", "ci_method", "ci_level", "job_dir",
            "sweep"]
    out = _sort(agg[list(dict.fromkeys(cols))].copy(), keys)
    out.attrs.update(_caption_attrs(agg, keys, "seeds", False))
    return out


def uncond_table(df: pd.DataFrame) -> pd.DataFrame:
    """The distribution of the bias attribute over the unconditional samples of every job that has them (class
    ``uncond``, counted with include_uncond=true): swept keys, value, count, fraction with its interval. Empty
    when no job sampled the unconditional model."""
    from biasamp.analysis.estimates import uncond_marginal

    method = str(df.attrs.get("ci_method", df["ci_method"].iloc[0]))
    level = float(df.attrs.get("ci_level", df["ci_level"].iloc[0]))
    n_boot, seed = int(df.attrs.get("n_boot", 2000)), int(df.attrs.get("seed", 0))
    keys = [k for k in swept_keys(df) if k != "rho_data"]
    swept_rho = _distinct(df["rho_data"]) > 1
    parts = []
    for _, row in _sort(df, keys).iterrows():
        job = load_job(row)
        table = uncond_marginal(job.counts, job.value_names, job.attribute, level=level, method=method,
                                n_boot=n_boot, seed=seed)
        if table.empty:
            continue
        table = table.rename(columns={"fraction": "rho"})  # the share of each value (its interval beside it)
        for key in reversed(["rho_data", *keys] if swept_rho else keys):
            table.insert(0, key, row[key])
        table["ci_method"], table["ci_level"] = method, level
        table["job_dir"], table["sweep"] = row["job_dir"], row["sweep"]
        parts.append(table)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(_caption_attrs(df, keys, "uncond", False))
    return out


# ------------------------------------------------------------------------------------------- formatting
def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def fmt_interval(rho: float, low: float, high: float) -> str:
    """``0.912 [0.861, 0.946]`` (empty when rho is missing)."""
    if _is_missing(rho):
        return ""
    return f"{rho:.3f} [{low:.3f}, {high:.3f}]"


@dataclass(frozen=True)
class Column:
    key: str
    numeric: bool
    cell: Callable[[pd.Series], str]  # "" for a missing cell


def _number_cell(key: str, spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[pd.Series], str]:
    def cell(row: pd.Series) -> str:
        value = row[key]
        return "" if _is_missing(value) else f"{scale * value:{spec}}{suffix}"
    return cell


def _interval_cell(key: str, low: str, high: str) -> Callable[[pd.Series], str]:
    return lambda row: fmt_interval(row[key], row[low], row[high])


def _value_cell(key: str) -> Callable[[pd.Series], str]:
    return lambda row: _fmt_value(row[key])


def _columns(table: pd.DataFrame) -> list[Column]:
    """How each shown column of ``table`` is formatted (interval bounds merge into their estimate)."""
    hidden = set(HIDDEN_IN_TEXT) | {c for pair in INTERVALS.values() for c in pair}
    special = {"delta": _number_cell("delta", "+.3f"), "rho_data": _number_cell("rho_data", ".3f"),
               "class_rho_data": _number_cell("class_rho_data", ".3f"),
               "invalid_frac": _number_cell("invalid_frac", ".1f", 100.0, "%"),
               "between_sd": _number_cell("between_sd", ".3f")}
    columns = []
    for c in table.columns:
        if c in hidden:
            continue
        if c in INTERVALS:
            columns.append(Column(c, True, _interval_cell(c, *INTERVALS[c])))
        elif c in special:
            columns.append(Column(c, True, special[c]))
        else:
            numeric = c != "class" and pd.api.types.is_numeric_dtype(table[c])
            columns.append(Column(c, numeric, _value_cell(c)))
    return columns


def _label(key: str, tex: bool) -> str:
    if tex and key in LABELS_TEX:
        return LABELS_TEX[key]
    name = LABELS_MD.get(key, key.removeprefix("sampler."))
    return latex_escape(name) if tex else name


def _header(col: Column, table: pd.DataFrame, tex: bool) -> str:
    label = _label(col.key, tex)
    if col.key in INTERVALS:
        pct = f"{100 * table.attrs.get('ci_level', 0.95):g}"
        return f"{label} [{pct}\\% CI]" if tex else f"{label} [{pct}% CI]"
    return label


def _caption(table: pd.DataFrame, tex: bool) -> str:
    a = table.attrs
    method = METHOD_NAMES.get(a.get("ci_method", ""), a.get("ci_method", ""))
    pct = f"{100 * a.get('ci_level', 0.95):g}"
    rho_model = LABELS_TEX["rho_model"] if tex else "ρ_model"
    rho_data = LABELS_TEX["rho_data"] if tex else "ρ_data"
    percent = r"\%" if tex else "%"
    dash = "--" if tex else "–"
    minus = "$-$" if tex else "−"
    delta = LABELS_TEX["delta"] if tex else "Δ"
    same_weight = (f"{rho_data}: the mean over the counted classes of each class's bias-aligned share in the "
                   f"training data, as {rho_model} weighs every class equally (n per class)")
    if a.get("kind") == "seeds":
        text = (f"{rho_model} over models that differ only by their training seed: the mean of the models' "
                f"{rho_model} with a {pct}{percent} interval that covers both the between-model and the sampling "
                f"variation (the hull of the t-interval over seeds and the Clopper{dash}Pearson interval of the "
                f"pooled counts); between-seed SD: the standard deviation of the per-seed {rho_model} (each "
                f"model's own interval is in the results table); {delta} = mean {rho_model} {minus} {rho_data}; "
                f"{same_weight}; n: all samples of all seeds.")
        fixed = a.get("fixed", [])
        if fixed:
            text += " Fixed: " + "; ".join(f"{_label(k, tex)} = {latex_escape(v) if tex else v}" for k, v in fixed)
            text += "."
        return text
    if a.get("kind") == "uncond":
        text = (f"Bias-attribute distribution of the unconditional samples (class uncond): each value's share (ρ) "
                f"with {pct}{percent} {method} intervals.")
        return text.replace("(ρ)", r"($\rho$)").replace("Clopper–Pearson", "Clopper--Pearson") if tex else text
    if a.get("kind") == "steering":
        text = (f"h-space steering per class: share of bias-aligned samples (ρ) with {pct}{percent} Clopper{dash}"
                f"Pearson intervals; target (aligned): the steering target's share of the class's aligned value; FD "
                f"= ‖p̂ {minus} target‖₂ over the bias values' shares (unsteered jobs against the uniform "
                f"distribution, as Balancing Act reports FD) with a {pct}{percent} interval (the image of the "
                f"Clopper{dash}Pearson interval with two values; a Bonferroni box over the values with more); "
                "invalid: share the oracle could not classify (counted in ρ and FD).")
        if tex:
            text = text.replace("(ρ)", r"($\rho$)").replace("‖p̂ $-$ target‖₂", r"$\|\hat p - t\|_2$")
    elif a.get("kind") == "bias":
        text = (f"InvDiff's Bias per class, sum over value pairs of |c_i {minus} c_j| / n / (V (V {minus} 1) / 2) "
                f"over the oracle's counts of the class's samples (|c_aligned {minus} c_conflicting| / n = |2ρ {minus} "
                f"1| with two values), with a {pct}{percent} interval (the image of the Clopper{dash}Pearson interval "
                "with two values; a Bonferroni box over the values with more); ρ: the class's bias-aligned share of "
                f"all its samples with {pct}{percent} Clopper{dash}Pearson intervals; mean: {rho_model} of the job "
                "(pooled counts) and the mean Bias over the classes, its interval the mean of the classes' bounds at "
                f"level 1 {minus} α/K (Bonferroni over the K classes); invalid: share the oracle could not "
                "classify (counted in ρ and Bias with the value the oracle found nearest).")
        if tex:
            text = text.replace("ρ", r"$\rho$").replace("α", r"$\alpha$")
            text = (text.replace(f"|c_i {minus} c_j| / n / (V (V {minus} 1) / 2)", r"$|c_i - c_j| / n / (V(V-1)/2)$")
                    .replace(f"|c_aligned {minus} c_conflicting| / n = |2$\\rho$ {minus} 1|",
                             r"$|c_\mathrm{aligned} - c_\mathrm{conflicting}| / n = |2\rho - 1|$"))
    elif a.get("kind") == "per_class":
        text = (f"Share of bias-aligned samples per class (ρ) with {pct}{percent} {method} intervals; "
                f"{rho_data} (class): the class's bias-aligned share in the training data.")
        if tex:
            text = text.replace("(ρ)", r"($\rho$)")
    else:
        text = (f"{rho_model}: share of bias-aligned samples among all class-conditional samples, "
                f"with {pct}{percent} {method} intervals; {delta} = {rho_model} {minus} {rho_data}; {same_weight}; "
                f"n: samples counted; invalid: share the oracle could not classify (counted in {rho_model}); "
                "NFE: denoiser evaluations per sample.")
    if a.get("fidelity"):
        text += (" class fidelity: share of the class-conditional samples that the class oracle (trained with "
                 f"attribute=target) assigns to their own class, same intervals ({dash} where not measured).")
    if a.get("corrected"):
        modes = a.get("confusion", [])
        code = latex_escape if tex else str
        used = {"per_class": "each class with its own confusion matrix (confusion: per_class)",
                "pooled": "one confusion matrix pooled over the classes (confusion: pooled)"}
        which = (used[modes[0]] if len(modes) == 1 and modes[0] in used else
                 "with the matrix the confusion column names (per_class: each class its own; pooled: one for all)")
        text += (f" {LABELS_TEX['rho_corrected'] if tex else 'ρ_corrected'}: corrected for the oracle's "
                 f"confusion measured on real data, {code(which)}; {pct}{percent} equal-tailed intervals of "
                 f"{a.get('n_boot', 2000)} draws from the Dirichlet posterior (prior 1/V per cell: Jeffreys for "
                 "a binary bias) of both the sample counts "
                 f"and the confusion counts, clipped to [0, 1] ({dash} where no confusion was measured).")
        for note in a.get("confusion_notes", []):
            text += f" Pooled confusion where {code(note)}."
    fixed = a.get("fixed", [])
    if fixed:
        items = [f"{_label(k, tex)} = {latex_escape(v) if tex else v}" for k, v in fixed]
        text += " Fixed: " + "; ".join(items) + "."
    text = text.replace("Clopper–Pearson", "Clopper--Pearson") if tex else text
    return text


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table after a ``Table: <caption>`` line (Pandoc's caption syntax); numbers right-aligned."""
    columns = _columns(table)

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"Table: {esc(_caption(table, tex=False))}", ""]
    lines.append("| " + " | ".join(esc(_header(c, table, tex=False)) for c in columns) + " |")
    lines.append("|" + "|".join("---:" if c.numeric else ":---" for c in columns) + "|")
    for _, row in table.iterrows():
        cells = [c.cell(row) or MISSING_MD for c in columns]
        lines.append("| " + " | ".join(esc(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--",
                 "…": r"\ldots{}", "−": "$-$"}


def latex_escape(text: str) -> str:
    return "".join(_TEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); signed numbers in math mode, missing cells as --."""
    columns = _columns(table)

    def cell(col: Column, row: pd.Series) -> str:
        text = col.cell(row)
        if not text:
            return MISSING_TEX
        if col.key == "delta":
            return f"${text}$"
        return latex_escape(text)

    lines = [
        f"% written by biasamp.report from {latex_escape(', '.join(table.attrs.get('sweeps', [])))}",
        "% needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\footnotesize",
        "\\setlength{\\tabcolsep}{4pt}",
        f"\\caption{{{_caption(table, tex=True)}}}",
        f"\\label{{{label}}}",
        "\\begin{tabular}{" + "".join("r" if c.numeric else "l" for c in columns) + "}",
        "\\toprule",
        " & ".join(_header(c, table, tex=True) for c in columns) + " \\\\",
        "\\midrule",
    ]
    for _, row in table.iterrows():
        lines.append(" & ".join(cell(c, row) for c in columns) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(table: pd.DataFrame, out_dir: str | Path, stem: str,
                 formats: Sequence[str] = TABLE_FORMATS) -> list[Path]:
    """Write ``table`` as <out_dir>/<stem>.{csv,md,tex} (those in ``formats``); returns the paths written.

    The CSV holds the numbers at full precision (plus job_dir and sweep); Markdown and LaTeX hold the
    formatted table and its caption.
    """
    unknown = [f for f in formats if f not in TABLE_FORMATS]
    if unknown:
        raise UsageError(f"tables={list(formats)!r}: unknown format(s) {unknown}; allowed: {list(TABLE_FORMATS)}")
    out_dir = Path(out_dir)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        if fmt == "csv":
            text = table.to_csv(index=False, lineterminator="\n")
        elif fmt == "md":
            text = to_markdown(table)
        else:
            text = to_latex(table, label=f"tab:{stem.replace('_', '-')}")
        atomic_write_text(path, text)
        paths.append(path)
    return paths
