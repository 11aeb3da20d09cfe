"""Report app: ``python -m biasamp.report sweep=<count sweep folder> [out_dir=...] [ci_method=...]``.

Reads one or more count sweeps (results.csv plus each job's counts.csv, meta.json and state.json), recomputes
every interval with the configured method and level, and writes into ``out_dir`` (default
``<first sweep>/report``):

- ``results.{csv,md,tex}``: one row per (checkpoint, setting); ``per_class.{csv,md,tex}``: rho per class;
  ``bias.{csv,md,tex}`` when a job counted an InvDiff model (InvDiff's Bias per class beside rho);
  ``seeds.{csv,md,tex}`` when settings were counted on models that differ only by their training seed (mean
  over seeds, between-seed SD, an interval with both sources of variation); ``uncond.{csv,md,tex}`` when jobs
  sampled the unconditional model;
- ``rho_vs_rho_data``, ``rho_vs_steps``, ``rho_vs_churn``, ``rho_vs_guidance`` (``.png``, ``.pdf``): each only
  when its key varies;
- ``heatmaps/<job>_<attribute>``: class x bias-value counts for at most ``max_heatmaps`` jobs (largest |delta|);
- ``report.json``: the settings, the sweeps and every file written (files of an earlier report into the same
  folder that this one does not rewrite are removed, so no stale figure survives).

It prints every path written. Bad input (no sweep, a missing folder or results.csv, a job file that is not as
biasamp.count wrote it, an unknown ci_method, a level outside (0, 1), an out_dir that is a file, ...) stops
the app with one line on stderr and exit status 2, before anything is written; any other error keeps its
traceback (biasamp.analysis.reporting does the work).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from biasamp.analysis.reporting import build_report, check_report_config
from biasamp.apps import run_app


def report(cfg: DictConfig) -> dict[str, Any]:
    """Check the config, build the report, print every path written."""
    settings = check_report_config(cfg)
    written = build_report(settings)
    n_sweeps = len(settings.sweeps)
    print(f"biasamp.report: {written['settings']} settings from {n_sweeps} sweep{'s' if n_sweeps > 1 else ''} "
          f"-> {settings.out_dir}")
    for path in written["tables"]:
        print(f"table: {path}")
    for path in written["figures"]:
        print(f"figure: {path}")
    return written


def run(cfg: DictConfig) -> dict[str, Any]:
    """The report app: one line on stderr and exit status 2 on bad input."""
    return run_app("report", lambda: report(cfg))


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
