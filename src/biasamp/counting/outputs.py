"""A count job's output files, made from its state alone: counts.csv (and matrix exports), meta.json, and the
job's rows of the sweep's results.csv. :func:`outputs_in_place` says whether all of them are there and agree
with the state (then a rerun has nothing to do); :func:`write_outputs` writes them (after sampling, or to
restore a lost or edited file without sampling)."""

from __future__ import annotations

import contextlib
import json
import math
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import biasamp
from biasamp.analysis import rho_model_from_counts
from biasamp.checkpoints import seed_free_identity, training_seed
from biasamp.counting.counts import COUNTS_NAME, counts_table, counts_text, matrix_path, write_counts, write_matrices
from biasamp.counting.job import RunStats
from biasamp.counting.meta import (
    JobMeta,
    class_oracle_entry,
    oracle_entry,
    read_meta,
    row_entry,
    write_meta,
)
from biasamp.counting.plan import UNCOND, Plan, data_rho
from biasamp.counting.results import RESULTS_NAME, ResultsRow, job_rows, update_results
from biasamp.counting.state import CountState
from biasamp.errors import UsageError
from biasamp.identity import identity_hash
from biasamp.oracles import CLASS_PRED


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    import torch

    return {"biasamp": biasamp.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": _version_of("lightning"), "numpy": np.__version__, "pandas": pd.__version__}


def _oracle_name(path: Any) -> str:
    """An oracle checkpoint's short name: its folder (runs/oracles/<name>/oracle.ckpt), else its file stem."""
    p = Path(str(path))
    return p.parent.name if p.name == "oracle.ckpt" and p.parent.name else p.stem


def oracle_options(plan: Plan) -> str:
    """The oracle's resolved options as they enter the job's identity (allowed colours, thresholds, the file's
    sha256 for a classifier; not its name, attributes or value names), as compact JSON for results.csv."""
    skip = {"oracle.name", "oracle.attributes", "oracle.value_names"}
    options = {k.removeprefix("oracle."): v for k, v in plan.identity.items()
               if k.startswith("oracle.") and k not in skip}
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def train_config(plan: Plan) -> str:
    """The hash of the checkpoint's run identity without its seed ("" for a checkpoint that stores no identity)."""
    return identity_hash(seed_free_identity(plan.meta)) if plan.meta.get("identity") else ""


def mitigation(plan: Plan) -> str:
    """What the checkpoint's run did to a biased model, for results.csv's ``mitigation`` column: "" for a model
    trained as usual; ``invdiff-<groups source> <mix> r=<r> lam=<lam>`` for InvDiff's mixed model
    (training.invdiff), e.g. ``invdiff-grouper convex r=0.8 lam=1``."""
    entry = plan.meta["config"].get("invdiff")
    if not entry:
        return ""
    return (f"invdiff-{entry.get('groups_source', 'groups')} {entry['mix']} r={float(entry['r']):g} "
            f"lam={float(entry['lam']):g}")


def steer_columns(steering: dict[str, Any] | None) -> dict[str, Any] | None:
    """The STEER_COLUMNS of results.csv for a steered job (None for an unsteered one)."""
    if steering is None:
        return None
    window = steering.get("sigma_window")
    return {"steer": steering["mode"], "steer_target": steering["target"], "steer_scale": steering["scale"],
            "steer_batch": steering.get("batch", 1), "steer_temperature": steering["temperature"],
            "steer_loss": steering.get("loss", ""), "steer_branches": steering["branches"],
            "steer_window": json.dumps(window) if window else "",
            "steer_heads": f"{steering['h_source']}:{steering['heads_sha256'][:8]}"}


def _table(plan: Plan, state: CountState) -> pd.DataFrame:
    return counts_table(state, plan.row_names, list(plan.oracle.attributes), [list(v) for v in plan.oracle.value_names])


def bias_attributes(plan: Plan) -> list[str]:
    """The oracle's bias attributes (its class_pred column, with a class oracle, is not one)."""
    return [a for a in plan.oracle.attributes if a != CLASS_PRED]


def outputs_in_place(plan: Plan, state: CountState, job_dir: Path, sweep_dir: Path) -> JobMeta | None:
    """The job's meta when every output file is there and agrees with ``state`` at ``n_per_class``: counts.csv
    equal to the state's counts, meta.json of this identity and n, the requested matrix exports, and one
    results.csv row per bias attribute with the state's n. None when anything must be (re)written."""
    s = plan.settings
    counts_file = job_dir / COUNTS_NAME
    if not counts_file.is_file() or counts_file.read_text() != counts_text(_table(plan, state)):
        return None
    try:
        meta = read_meta(job_dir)
    except UsageError:
        return None
    if meta.identity != plan.identity or meta.n_per_class != s.n_per_class or meta.row_names != plan.row_names:
        return None
    if s.export_matrix and not all(matrix_path(job_dir, a).is_file() for a in plan.oracle.attributes):
        return None
    rows = job_rows(sweep_dir / RESULTS_NAME, job_dir.name)
    n = sum(state.done[r.name] for r in plan.rows if r.class_index is not None)
    if len(rows) == 0 or sorted(rows["attribute"].astype(str)) != sorted(bias_attributes(plan)):
        return None
    if not (pd.to_numeric(rows["n"], errors="coerce") == n).all():
        return None
    return meta


def write_outputs(plan: Plan, state: CountState, stats: RunStats, job_dir: Path, sweep_dir: Path,
                  world: int = 1, device: str = "cpu", steering_trace: list | None = None) -> JobMeta:
    """Write counts.csv (+ matrices), meta.json and the job's results.csv rows from ``state``; print and
    return the summary's meta. ``stats`` describes this session's sampling (none: a restore)."""
    s = plan.settings
    attributes, values = list(plan.oracle.attributes), [list(v) for v in plan.oracle.value_names]
    table = _table(plan, state)
    write_counts(job_dir, table)
    if s.export_matrix:
        write_matrices(job_dir, table, attributes, values, plan.row_names, s.export_matrix)

    class_names = [str(c) for c in plan.meta["class_names"]]
    level = s.ci_level
    fidelity = None
    if CLASS_PRED in attributes:  # the class classifier's column: class fidelity, not a bias attribute
        fidelity = rho_model_from_counts(table, class_names, class_names, CLASS_PRED, level=level)
        values = [v for a, v in zip(attributes, values, strict=True) if a != CLASS_PRED]
        attributes = [a for a in attributes if a != CLASS_PRED]
    counted = [r.name for r in plan.rows if r.class_index is not None]
    rho_data = {a: data_rho(plan.meta, a, len(attributes), counted) for a in attributes}
    est = {a: rho_model_from_counts(table, class_names, v, a, level=level)
           for a, v in zip(attributes, values, strict=True)}
    est_valid = {a: rho_model_from_counts(table, class_names, v, a, level=level, valid_only=True)
                 for a, v in zip(attributes, values, strict=True)}
    fidelity_figures = None if fidelity is None else dict(zip(
        ("class_fidelity", "class_fidelity_low", "class_fidelity_high", "class_fidelity_n", "class_fidelity_k"),
        (fidelity.rho_model, fidelity.ci_low, fidelity.ci_high, fidelity.n, fidelity.n_aligned), strict=True))
    n_invalid = int(table.loc[~table["valid"].astype(bool) & (table["class"] != UNCOND), "count"].sum())
    nfe = stats.nfe_per_image if math.isfinite(stats.nfe_per_image) else state.nfe_per_image
    images_per_s = stats.images_per_s if stats.images else None
    wall_time_s, first_batch_s, steady = stats.seconds, stats.first_batch_s, stats.steady_images_per_s
    if not stats.images:  # a restore: keep the speed the job was counted at, when its meta.json still says it
        with contextlib.suppress(UsageError, TypeError):
            old = read_meta(job_dir)
            if old.identity == plan.identity:
                images_per_s, wall_time_s = old.images_per_s, old.wall_time_s
                first_batch_s, steady = old.first_batch_s, old.steady_images_per_s
    summary = "; ".join(
        f"{a}: rho_model={est[a].rho_model:.4f} [{est[a].ci_low:.4f}, {est[a].ci_high:.4f}] rho_data={rho_data[a]:.4f}"
        for a in attributes)
    if fidelity is not None:
        summary += f"; class fidelity={fidelity.rho_model:.4f} [{fidelity.ci_low:.4f}, {fidelity.ci_high:.4f}]"
    speed = f"{images_per_s:.1f} img/s" if images_per_s else "nothing sampled"
    summary = (f"biasamp.count: {job_dir.name}: {summary} ({int(level * 100)}% CP, n={est[attributes[0]].n}, "
               f"invalid={n_invalid}) {speed}, {'?' if nfe is None else f'{nfe:g}'} NFE/img")
    if stats.steady_images_per_s is not None:  # where compile time goes: the first batch, then the warm speed
        summary += f" (first batch {stats.first_batch_s:.1f} s, then {stats.steady_images_per_s:.1f} img/s)"
    interval = list(s.guidance_interval) if s.guidance_interval else None
    steering = None if plan.steering is None else {**plan.steering, "heads": str(s.steer["heads"])}
    if steering is not None:  # the heads' view of the steered rows of this session (rank 0's rows)
        if steering_trace is None:
            with contextlib.suppress(UsageError, TypeError, AttributeError):
                steering_trace = (read_meta(job_dir).steering or {}).get("trace")
        steering["trace"] = steering_trace
    meta = JobMeta(
        checkpoint=str(plan.checkpoint), checkpoint_sha256=plan.checkpoint_sha256,
        checkpoint_finished=bool(plan.meta["finished"]), allow_unfinished=s.allow_unfinished, run=plan.run,
        n_img_trained=plan.meta["n_img"], dataset=plan.meta["config"]["dataset"],
        dataset_summary=plan.meta.get("data"), rho_data=rho_data[attributes[0]], rho_data_by_attribute=rho_data,
        class_names=class_names, model=plan.meta["config"]["model"].get("name"), sampler=s.sampler,
        guidance=s.guidance, guidance_uncond=s.guidance_uncond, guidance_interval=interval,
        oracle=oracle_entry(s.oracle, plan.oracle.attributes, plan.oracle.value_names, plan.oracle.confusion),
        class_oracle=None if fidelity is None else class_oracle_entry(
            str(s.class_oracle), getattr(plan.oracle, "class_confusion", None), fidelity_figures),
        steering=steering, precision=s.precision, seed=s.seed, n_per_class=s.n_per_class,
        rows=[row_entry(r.name, r.class_index, state.done[r.name]) for r in plan.rows],
        identity=plan.identity, identity_hash=identity_hash(plan.identity), nfe_per_image=nfe,
        wall_time_s=wall_time_s, images_this_session=stats.images, images_per_s=images_per_s,
        first_batch_s=first_batch_s, steady_images_per_s=steady,
        batch_size=state.batch_size, world_size=world, device=device, versions=_versions(),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"), rho_model=est[attributes[0]].rho_model,
        rho_model_by_attribute={a: est[a].rho_model for a in attributes}, summary=summary)
    write_meta(job_dir, meta)
    update_results(sweep_dir / RESULTS_NAME, [ResultsRow(
        job_dir=job_dir.name, run=plan.run, mitigation=mitigation(plan), checkpoint=str(plan.checkpoint),
        train_seed=training_seed(plan.meta),
        train_config=train_config(plan), n_img=int(plan.meta["n_img"]), dataset=meta.dataset["name"],
        attribute=a, rho_data=rho_data[a], sampler=s.sampler, guidance=s.guidance, guidance_uncond=s.guidance_uncond,
        guidance_interval=json.dumps(interval) if interval else "", oracle=s.oracle["name"],
        oracle_options=oracle_options(plan), class_oracle=_oracle_name(s.class_oracle) if s.class_oracle else "",
        precision=s.precision, seed=s.seed,
        n_per_class=s.n_per_class, n=est[a].n, n_aligned=est[a].n_aligned, rho_model=est[a].rho_model,
        ci_low=est[a].ci_low, ci_high=est[a].ci_high, ci_method=est[a].ci_method, ci_level=est[a].ci_level,
        delta=est[a].rho_model - rho_data[a], n_invalid=n_invalid, rho_model_valid=est_valid[a].rho_model,
        nfe=nfe, images_per_s=images_per_s, fidelity=fidelity_figures, steering=steer_columns(plan.steering),
    ) for a in attributes])
    print(summary)
    return meta

