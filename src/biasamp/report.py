"""Report app: ``python -m biasamp.report sweep=<count sweep folder> [out_dir=...] [ci_method=...]``.

Reads one or more count sweeps (results.csv plus each job's counts.csv and meta.json), recomputes every
interval with the configured method and level, and writes into ``out_dir`` (default ``<first sweep>/report``):

- ``results.{csv,md,tex}``: one row per (checkpoint, setting); ``per_class.{csv,md,tex}``: rho per class;
- ``rho_vs_rho_data``, ``rho_vs_steps``, ``rho_vs_churn``, ``rho_vs_guidance`` (``.png``, ``.pdf``): each only
  when its key varies;
- ``heatmaps/<job>_<attribute>``: class x bias-value counts for at most ``max_heatmaps`` jobs (largest |delta|);
- ``report.json``: the settings, the sweeps and every file written (files of an earlier report into the same
  folder that this one does not rewrite are removed, so no stale figure survives).

It prints every path written. Bad input (no sweep, a missing folder or results.csv, an unknown ci_method, a
level outside (0, 1), ...) stops the app with one line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import json
import numbers
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from biasamp.analysis.intervals import check_level, check_method
from biasamp.analysis.plots import FIGURE_FORMATS, LINE_PLOTS, plot_count_heatmap, setting_label
from biasamp.analysis.tables import (
    TABLE_FORMATS,
    expand_sweeps,
    load_job,
    load_results,
    per_class_table,
    results_table,
    swept_keys,
    write_tables,
)
from biasamp.atomic import atomic_write_json

MANIFEST = "report.json"


class ReportConfigError(ValueError):
    """A report setting that cannot work; the message is one line."""


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


def _int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ReportConfigError(f"{key}={value!r} is not allowed: must be an integer >= {minimum}")
    return int(value)


def _choices(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> list[str]:
    value = OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or any(v not in allowed for v in items):
        raise ReportConfigError(f"{key}={value!r} is not allowed: give a list drawn from {list(allowed)}")
    return list(dict.fromkeys(items))


def check_report_config(cfg: DictConfig) -> Settings:
    """Validate every setting and find the sweep folders; raises ReportConfigError, ValueError or
    FileNotFoundError with a one-line message."""
    if OmegaConf.is_missing(cfg, "sweep") or cfg.sweep is None:
        raise ReportConfigError("sweep is required: python -m biasamp.report sweep=<count sweep folder> "
                                "(the folder of results.csv written by python -m biasamp.count)")
    method = check_method(cfg.ci_method)
    if isinstance(cfg.ci_level, bool) or not isinstance(cfg.ci_level, numbers.Real):
        raise ReportConfigError(f"ci_level={cfg.ci_level!r} is not allowed: must be a number in (0, 1)")
    level = check_level(cfg.ci_level)
    width = cfg.column_width_in
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 1.0 <= width <= 20.0:
        raise ReportConfigError(f"column_width_in={width!r} is not allowed: a figure width in inches, 1 to 20")
    settings = dict(
        ci_method=method, ci_level=level, n_boot=_int(cfg, "n_boot", 1), boot_seed=_int(cfg, "boot_seed", 0),
        formats=_choices(cfg, "formats", FIGURE_FORMATS), tables=_choices(cfg, "tables", TABLE_FORMATS),
        width_in=float(width), dpi=_int(cfg, "dpi", 50), max_heatmaps=_int(cfg, "max_heatmaps", 0),
    )
    sweep = OmegaConf.to_container(cfg.sweep) if OmegaConf.is_config(cfg.sweep) else cfg.sweep
    sweeps = expand_sweeps([str(s) for s in sweep] if isinstance(sweep, list) else str(sweep))
    out_dir = Path(str(cfg.out_dir)).expanduser() if cfg.out_dir is not None else sweeps[0] / "report"
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
        oracle = job.meta["oracle"]
        for attribute, values in zip(oracle["attributes"], oracle["value_names"], strict=True):
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
    results = results_table(df)
    per_class = per_class_table(df)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    tables = write_tables(results, s.out_dir, "results", s.tables)
    tables += write_tables(per_class, s.out_dir, "per_class", s.tables)
    figures: list[Path] = []
    for plot in LINE_PLOTS:
        figures += plot(df, s.out_dir, formats=s.formats, width_in=s.width_in, dpi=s.dpi)
    figures += write_heatmaps(df, swept_keys(df), s.out_dir, s)
    written = [*tables, *figures]
    _remove_stale(s.out_dir, written)
    atomic_write_json(s.out_dir / MANIFEST, {
        "sweeps": [str(p) for p in s.sweeps], "ci_method": s.ci_method, "ci_level": s.ci_level,
        "n_boot": s.n_boot, "boot_seed": s.boot_seed, "settings": len(df), "swept_keys": results.attrs["keys"],
        "files": [str(p.relative_to(s.out_dir)) for p in written],
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return {"tables": tables, "figures": figures, "settings": len(df)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, build the report, print every path; exit status 2 with one line on bad input."""
    try:
        settings = check_report_config(cfg)
        written = build_report(settings)
    except (ValueError, FileNotFoundError) as err:
        message = (str(err).splitlines() or [type(err).__name__])[0]
        print(f"biasamp.report: error: {message}", file=sys.stderr)
        sys.exit(2)
    n_sweeps = len(settings.sweeps)
    print(f"biasamp.report: {written['settings']} settings from {n_sweeps} sweep{'s' if n_sweeps > 1 else ''} "
          f"-> {settings.out_dir}")
    for path in written["tables"]:
        print(f"table: {path}")
    for path in written["figures"]:
        print(f"figure: {path}")
    return written


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
