"""The report app's work: its settings checked once, then tables and figures from one or more count sweeps.

:func:`check_report_config` is the report app's schema (UsageError, one line, before anything is read or
written); :func:`build_report` reads the sweeps (every file checked while the tables are built, before anything
is written) and writes the tables, the figures and ``report.json`` into ``out_dir``.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from biasamp.analysis.correction import CONFUSION_MODES
from biasamp.analysis.intervals import METHODS
from biasamp.analysis.plots import FIGURE_FORMATS, LINE_PLOTS, plot_count_heatmap, plot_rho_vs_scale, setting_label
from biasamp.analysis.seeds import plot_frame, seed_table
from biasamp.analysis.tables import (
    TABLE_FORMATS,
    bias_table,
    expand_sweeps,
    load_job,
    load_results,
    per_class_table,
    results_table,
    seeds_table,
    steering_table,
    swept_keys,
    uncond_table,
    write_tables,
)
from biasamp.atomic import atomic_write_json
from biasamp.errors import UsageError

MANIFEST = "report.json"


@dataclass(frozen=True)
class Settings:
    sweeps: list[Path]
    out_dir: Path
    ci_method: str
    ci_level: float
    n_boot: int
    boot_seed: int
    formats: list[str]
    tables: list[str]
    width_in: float
    dpi: int
    max_heatmaps: int
    confusion: str = "auto"  # which oracle confusion corrects rho: auto | per_class | pooled (corrected_rho)


def _int(cfg: Any, key: str, minimum: int) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UsageError(f"{key}={value!r} is not allowed: must be an integer >= {minimum}")
    return int(value)


def _choices(cfg: Any, key: str, allowed: tuple[str, ...]) -> list[str]:
    value = OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or any(v not in allowed for v in items):
        raise UsageError(f"{key}={value!r} is not allowed: give a list drawn from {list(allowed)}")
    return list(dict.fromkeys(items))


def _sweeps(cfg: Any) -> list[str]:
    sweep = OmegaConf.to_container(cfg.sweep) if OmegaConf.is_config(cfg.sweep) else cfg.sweep
    return [str(s) for s in sweep] if isinstance(sweep, list) else [str(sweep)]


TOP_KEYS = ("sweep", "out_dir", "ci_method", "ci_level", "n_boot", "boot_seed", "formats", "tables",
            "column_width_in", "dpi", "max_heatmaps", "confusion")


def check_report_config(cfg: Any) -> Settings:
    """The report app's schema: validate every setting and find the sweep folders, before anything is read or
    written; raises UsageError with a one-line message."""
    unknown = sorted(set(cfg) - set(TOP_KEYS))
    if unknown:
        raise UsageError(f"{unknown[0]} is not a setting of the report app (allowed: {', '.join(TOP_KEYS)}); check "
                         "the spelling")
    if OmegaConf.is_missing(cfg, "sweep") or cfg.sweep is None:
        raise UsageError("sweep is required: python -m biasamp.report sweep=<count sweep folder> "
                         "(the folder of results.csv written by python -m biasamp.count)")
    if cfg.ci_method not in METHODS:
        raise UsageError(f"ci_method={cfg.ci_method!r} is not allowed: use one of {', '.join(METHODS)}")
    level = cfg.ci_level
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise UsageError(f"ci_level={level!r} is not allowed: must be a number in (0, 1)")
    width = cfg.column_width_in
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 1.0 <= width <= 20.0:
        raise UsageError(f"column_width_in={width!r} is not allowed: a figure width in inches, 1 to 20")
    confusion = cfg.get("confusion", "auto")
    if not isinstance(confusion, str) or confusion not in CONFUSION_MODES:
        raise UsageError(f"confusion={confusion!r} is not allowed: use one of {', '.join(CONFUSION_MODES)}")
    settings = dict(
        ci_method=str(cfg.ci_method), ci_level=float(level), n_boot=_int(cfg, "n_boot", 1),
        boot_seed=_int(cfg, "boot_seed", 0), formats=_choices(cfg, "formats", FIGURE_FORMATS),
        tables=_choices(cfg, "tables", TABLE_FORMATS), width_in=float(width), dpi=_int(cfg, "dpi", 50),
        max_heatmaps=_int(cfg, "max_heatmaps", 0), confusion=confusion,
    )
    sweeps = expand_sweeps(_sweeps(cfg))
    out_dir = Path(str(cfg.out_dir)).expanduser() if cfg.out_dir is not None else sweeps[0] / "report"
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"out_dir={cfg.out_dir if cfg.out_dir is not None else out_dir}: {blocker} is a file, "
                         "not a folder; give out_dir=<a folder> (it is made if missing)")
    return Settings(sweeps=sweeps, out_dir=out_dir.resolve(), **settings)


def _heatmap_rows(df: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The ``limit`` jobs with the largest |rho_model - rho_data| (ties: table order)."""
    order = df.assign(_abs=df["delta"].abs()).sort_values("_abs", ascending=False, kind="stable", na_position="last")
    return order.head(limit).drop(columns="_abs")


def _heatmap_name(row: pd.Series, df: pd.DataFrame) -> str:
    """The job's setting (the part of job_dir after '__') when that is unique, else its whole name."""
    job = str(row["job_dir"])
    short = job.split("__", 1)[-1]
    jobs = df.drop_duplicates(["sweep", "job_dir"])["job_dir"].astype(str)  # a job has a row per attribute
    if (jobs.str.split("__", n=1).str[-1] == short).sum() == 1:
        return short
    if (jobs == job).sum() == 1:
        return job
    return f"{Path(str(row['sweep'])).name}__{job}"


def write_heatmaps(df: pd.DataFrame, keys: list[str], out_dir: Path, s: Settings) -> list[Path]:
    paths: list[Path] = []
    bias_attributes = {str(a) for a in df["attribute"]} if "attribute" in df.columns else set()
    for _, row in _heatmap_rows(df, s.max_heatmaps).iterrows():
        job = load_job(row)
        label = setting_label(row, keys) if keys else str(row["job_dir"]).split("__", 1)[-1]
        title = f"{label}\n" + r"$\rho_\mathrm{model}$" + f" = {row['rho_model']:.3f}"
        for attribute, values in zip(job.meta.attributes, job.meta.value_names, strict=True):
            # a job has a row per bias attribute, each drawing its own; other columns (class_pred) go with each
            if "attribute" in df.columns and str(attribute) != job.attribute and str(attribute) in bias_attributes:
                continue
            stem = out_dir / "heatmaps" / f"{_heatmap_name(row, df)}_{attribute}"
            paths += plot_count_heatmap(job.counts, job.class_names, [str(v) for v in values], str(attribute), stem,
                                        title=title, formats=s.formats, width_in=s.width_in, dpi=s.dpi)
    return paths


def _remove_stale(out_dir: Path, written: list[Path]) -> None:
    """Delete the files an earlier report listed in its manifest that this report did not write again."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return
    try:
        old = json.loads(manifest.read_text()).get("files", [])
    except (ValueError, AttributeError):
        return
    keep = {str(p) for p in written}
    for name in old:
        path = out_dir / name
        if str(path) not in keep and path.is_file() and path.resolve().parent.is_relative_to(out_dir):
            path.unlink()


def build_report(s: Settings) -> dict[str, Any]:
    """Load the sweeps and write every table and figure; returns {"tables": [...], "figures": [...]}.

    Every file of every job is read (and checked) while the tables are built, before anything is written.
    """
    df = load_results(s.sweeps, method=s.ci_method, level=s.ci_level, n_boot=s.n_boot, seed=s.boot_seed)
    df.attrs["confusion"] = s.confusion  # the matrices the oracle-error correction uses (both tables read it)
    results = results_table(df)
    per_class = per_class_table(df)
    aggregate = seed_table(df)  # settings counted on models that differ only by their training seed
    seeds = seeds_table(df, aggregate)
    uncond = uncond_table(df)
    steering = steering_table(df)  # jobs with h-space steering: FD per class, beside rho
    bias = bias_table(df)  # when a job counted an InvDiff model: InvDiff's Bias per class, beside rho
    s.out_dir.mkdir(parents=True, exist_ok=True)
    tables = write_tables(results, s.out_dir, "results", s.tables)
    tables += write_tables(per_class, s.out_dir, "per_class", s.tables)
    if not seeds.empty:  # settings counted on models that differ only by their training seed
        tables += write_tables(seeds, s.out_dir, "seeds", s.tables)
    if not uncond.empty:  # jobs that sampled the unconditional model
        tables += write_tables(uncond, s.out_dir, "uncond", s.tables)
    if not steering.empty:
        tables += write_tables(steering, s.out_dir, "steering", s.tables)
    if not bias.empty:
        tables += write_tables(bias, s.out_dir, "bias", s.tables)
    figures: list[Path] = []
    lines = plot_frame(df, aggregate)  # a replicated setting is one line: its mean over seeds, the aggregate band
    if not steering.empty:  # steered jobs have their own figure (against the scale); the others show the rest
        lines = lines[lines["steer"].isna()] if "steer" in lines.columns else lines
    for plot in LINE_PLOTS:
        figures += plot(lines, s.out_dir, formats=s.formats, width_in=s.width_in, dpi=s.dpi)
    if not steering.empty:  # the dose-response: rho_model against the steering scale, with the targets
        target = steering.groupby(["sweep", "job_dir"])["target_aligned"].mean().rename("target_aligned")
        steered = df.join(target, on=["sweep", "job_dir"])
        figures += plot_rho_vs_scale(steered, s.out_dir, formats=s.formats, width_in=s.width_in, dpi=s.dpi)
    figures += write_heatmaps(df, swept_keys(df), s.out_dir, s)
    written = [*tables, *figures]
    _remove_stale(s.out_dir, written)
    atomic_write_json(s.out_dir / MANIFEST, {
        "sweeps": [str(p) for p in s.sweeps], "ci_method": s.ci_method, "ci_level": s.ci_level,
        "n_boot": s.n_boot, "boot_seed": s.boot_seed, "settings": len(df), "swept_keys": results.attrs["keys"],
        "confusion": s.confusion, "files": [str(p.relative_to(s.out_dir)) for p in written],
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return {"tables": tables, "figures": figures, "settings": len(df)}
