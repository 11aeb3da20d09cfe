"""Count app: ``python -m biasamp.count checkpoint=<ckpt> [sampler=...] [guidance=...] [-m ...]``.

Samples the checkpoint's EMA denoiser under one sampling setting, classifies every sample's bias with an
oracle and writes exact counts (conf/count.yaml describes every option). Everything is checked before
sampling; a bad value stops the app with one line on stderr and exit status 2. The job continues where it
stopped when rerun, and a finished job rerun does no sampling.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import numbers
import platform
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import biasamp
from biasamp.analysis import rho_model_from_counts
from biasamp.atomic import atomic_write_bytes, atomic_write_json
from biasamp.checkpoints import load_denoiser, resolve_checkpoint
from biasamp.counting.files import counts_table, sha256_file, update_results, write_counts, write_matrices
from biasamp.counting.job import CountSetup, Row, grid_images, run_rows
from biasamp.counting.state import CountState
from biasamp.launch import ddp_job, prepare_relaunch
from biasamp.oracles import CLASS_PRED, build_oracle, with_class_prediction
from biasamp.sampling import check_sampler_config
from biasamp.speed import (
    SpeedConfigError,
    check_compile_mode,
    check_switch,
    device_type,
    fast_denoiser,
    probe_batch_size,
    resolve_precision,
)

UNCOND = "uncond"
GUIDANCE_UNCOND = ("null", "class_mean")
EXPORT_MATRIX = (None, "wide", "seed")


# ------------------------------------------------------------------------------------------- folder names
def ckpt_name(path: Any) -> str:
    """<run folder>-<checkpoint stem>, e.g. quickstart_rho0.9_seed0-ckpt-0000040000 (a run folder names its
    latest checkpoint)."""
    try:
        p = resolve_checkpoint(str(path))
    except (FileNotFoundError, ValueError):
        p = Path(str(path))
    run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
    return f"{run}-{p.stem}" if run else p.stem


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def count_precision(precision: Any, accelerator: Any) -> str:
    """The resolved sampling precision (fp32 | bf16) of ``precision`` (fp32 | bf16 | auto) on ``accelerator``."""
    try:
        return resolve_precision("precision", precision, device_type(accelerator))
    except SpeedConfigError as err:
        raise CountConfigError(str(err)) from None


def setting_name(sampler: Any, guidance: Any, uncond: Any, interval: Any, oracle: Any, seed: Any,
                 precision: Any = "fp32", accelerator: Any = "auto", class_oracle: Any = None) -> str:
    """A readable, unique folder name for one sampling setting: the main knobs plus a hash of all of them.

    A bf16 job gets a ``-bf16`` part and its own hash, a job with a class oracle a ``-fid`` part; other jobs
    keep the names they had before these were settings."""
    sampler, oracle, interval = _plain(sampler), _plain(oracle), _plain(interval)
    try:
        resolved = count_precision(precision, accelerator)
    except CountConfigError:
        resolved = str(precision)  # check_and_plan reports it
    items = [sampler, guidance, uncond, interval, oracle, seed]
    if resolved != "fp32":
        items.append({"precision": resolved})
    if class_oracle:
        items.append({"class_oracle": str(class_oracle)})
    blob = json.dumps(items, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    parts = [str(sampler.get("name"))]
    if sampler.get("name") == "edm":
        parts += [str(sampler.get("solver")), f"steps{sampler.get('num_steps')}", f"churn{sampler.get('s_churn'):g}"]
    else:
        parts += [f"steps{sampler.get('num_steps')}"]
    parts.append(f"w{guidance:g}" if isinstance(guidance, numbers.Real) else f"w{guidance}")
    if resolved != "fp32":
        parts.append(resolved)
    if class_oracle:
        parts.append("fid")
    return "-".join(parts) + f"-{digest}"


OmegaConf.register_new_resolver("biasamp_ckpt_name", ckpt_name, replace=True)
OmegaConf.register_new_resolver("biasamp_setting", setting_name, replace=True)


# ------------------------------------------------------------------------------------------- checks
class CountConfigError(ValueError):
    """A count setting that cannot work; the message is one line."""


def _int(cfg: Mapping[str, Any], key: str, minimum: int) -> int:
    value = cfg.get(key)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise CountConfigError(f"{key}={value!r} is not allowed: must be an integer >= {minimum}")
    return int(value)


@dataclass
class Plan:
    """Everything a count job needs, checked."""

    checkpoint: Path
    checkpoint_sha256: str
    net: torch.nn.Module
    meta: dict[str, Any]
    oracle: Any
    rows: list[Row]
    fingerprint: str
    interval: tuple[float, float] | None
    uncond: str
    precision: str = "fp32"  # resolved: fp32 | bf16


def check_and_plan(cfg: DictConfig) -> Plan:
    """Validate the whole config and load what it names; raises CountConfigError/ValueError/FileNotFoundError."""
    guidance = cfg.guidance
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool) or not guidance >= 0:
        raise CountConfigError(f"guidance={guidance!r} is not allowed: the guidance scale w must be a number >= 0 "
                               "(D = (1 + w) D_cond - w D_uncond; 0 is plain conditional sampling)")
    uncond = "null" if cfg.guidance_uncond is None else cfg.guidance_uncond
    if uncond not in GUIDANCE_UNCOND:
        raise CountConfigError(f"guidance_uncond={cfg.guidance_uncond!r} is not allowed: use null or class_mean")
    interval = _plain(cfg.guidance_interval)
    if interval is not None:
        ok = (isinstance(interval, list) and len(interval) == 2
              and all(isinstance(v, numbers.Real) for v in interval) and 0 <= interval[0] < interval[1])
        if not ok:
            raise CountConfigError(f"guidance_interval={interval!r} is not allowed: give [sigma_lo, sigma_hi] "
                                   "with 0 <= sigma_lo < sigma_hi, or null")
        interval = (float(interval[0]), float(interval[1]))
    check_sampler_config(_plain(cfg.sampler))
    precision = count_precision(cfg.get("precision", "fp32"), cfg.fabric.accelerator)
    try:
        check_switch("compile", cfg.get("compile", False))
        check_switch("channels_last", cfg.get("channels_last", False))
        check_compile_mode("compile_mode", cfg.get("compile_mode", "default"))
    except SpeedConfigError as err:
        raise CountConfigError(str(err)) from None
    _int(cfg, "n_per_class", 1)
    bs = cfg.batch_size
    if bs != "auto" and (not isinstance(bs, numbers.Integral) or isinstance(bs, bool) or bs < 1):
        raise CountConfigError(f"batch_size={bs!r} is not allowed: an integer >= 1 (samples per forward on each "
                               "device), or auto (the largest that fits on a GPU)")
    _int(cfg, "seed", 0)
    _int(cfg, "grid_per_class", 0)
    if not isinstance(cfg.ci_level, numbers.Real) or not 0 < cfg.ci_level < 1:
        raise CountConfigError(f"ci_level={cfg.ci_level!r} is not allowed: must be in (0, 1)")
    if cfg.export_matrix not in EXPORT_MATRIX:
        raise CountConfigError(f"export_matrix={cfg.export_matrix!r} is not allowed: use null, wide or seed")
    _int(cfg.fabric, "devices", 1)

    checkpoint = resolve_checkpoint(str(cfg.checkpoint)).resolve()
    net, meta = load_denoiser(checkpoint)
    class_names = [str(c) for c in meta["class_names"]]
    wanted = class_names if cfg.classes is None else [str(c) for c in _plain(cfg.classes)]
    unknown = [c for c in wanted if c not in class_names]
    if unknown or not wanted:
        raise CountConfigError(f"classes={_plain(cfg.classes)!r}: unknown class(es) {unknown}; "
                               f"this checkpoint has {class_names}")
    rows = [Row(c, class_names.index(c)) for c in wanted]
    if cfg.include_uncond:
        rows.append(Row(UNCOND, None))
    oracle = build_oracle(_plain(cfg.oracle), meta)
    for attribute in oracle.attributes:  # each bias column needs the training data's rho (before any sampling)
        data_rho(meta, attribute, len(oracle.attributes))
    class_oracle = cfg.get("class_oracle")
    if class_oracle:
        oracle = with_class_prediction(oracle, str(class_oracle), meta)
    sha = sha256_file(checkpoint)
    identity = {
        "checkpoint_sha256": sha, "sampler": _plain(cfg.sampler), "guidance": float(guidance), "uncond": uncond,
        "interval": interval, "oracle": _plain(cfg.oracle), "seed": int(cfg.seed), "format": 1,
    }
    if precision != "fp32":  # bf16 samples differ from fp32 ones: never continue one job as the other
        identity["precision"] = precision
    if class_oracle:  # one more count column
        identity["class_oracle_sha256"] = sha256_file(Path(str(class_oracle)).expanduser())
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return Plan(checkpoint, sha, net, meta, oracle, rows, fingerprint, interval, uncond, precision)


# ------------------------------------------------------------------------------------------- the app
@contextlib.contextmanager
def _job_lock(job_dir: Path) -> Iterator[None]:
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / "job.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CountConfigError(f"another process is counting into {job_dir}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    return {"biasamp": biasamp.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "lightning": _version_of("lightning"), "numpy": np.__version__, "pandas": pd.__version__}


def _flat(prefix: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in mapping.items()}


# The last prepared denoiser of this process, by (checkpoint sha256, device, speed switches): the jobs of a
# multirun (one process, one job after another) over the same checkpoint reuse it, and with it its compiled
# graphs, so torch.compile's warm-up is paid once per sweep rather than once per setting.
_PREPARED: dict[tuple, Any] = {}


def prepared_denoiser(plan: Plan, device: torch.device, cfg: DictConfig) -> Any:
    key = (plan.checkpoint_sha256, str(device), plan.precision, str(cfg.channels_last), str(cfg.compile),
           str(cfg.compile_mode))
    if key not in _PREPARED:
        _PREPARED.clear()  # one checkpoint's weights at a time
        _PREPARED[key] = fast_denoiser(plan.net, device, precision=plan.precision, channels_last=cfg.channels_last,
                                       compile=cfg.compile, compile_mode=cfg.compile_mode)
    return _PREPARED[key]


def run(cfg: DictConfig) -> dict[str, Any] | None:
    with ddp_job():
        return _run(cfg)


def _run(cfg: DictConfig) -> dict[str, Any] | None:
    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    sweep_dir = job_dir.parent
    try:
        plan = check_and_plan(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"biasamp.count: error: {err}", file=sys.stderr)
        sys.exit(2)

    import lightning as L  # here, not at the top: a bad-input error or a finished job needs none of its 3 s import

    world = int(cfg.fabric.devices) * int(cfg.fabric.num_nodes)
    fabric = L.Fabric(accelerator=cfg.fabric.accelerator, devices=cfg.fabric.devices,
                      num_nodes=cfg.fabric.num_nodes, strategy="ddp" if world > 1 else "auto")
    prepare_relaunch()
    fabric.launch()
    writer = fabric.is_global_zero
    oracle = plan.oracle.to(fabric.device)
    shape = (*[len(v) for v in oracle.value_names], 2)
    state = CountState.load_or_new(job_dir, plan.fingerprint, shape)
    n = int(cfg.n_per_class)
    todo = sum(max(n - state.done.get(r.name, 0), 0) for r in plan.rows)
    files_done = all((job_dir / f).is_file() for f in ("counts.csv", "meta.json"))
    if todo == 0 and files_done and (sweep_dir / "results.csv").is_file():
        meta = json.loads((job_dir / "meta.json").read_text())
        if meta.get("n_per_class") == n and [r["name"] for r in meta["rows"]] == [r.name for r in plan.rows]:
            if writer:
                print(f"biasamp.count: {job_dir.name}: already complete, nothing to sample")
                print(meta["summary"])
            return meta

    net = prepared_denoiser(plan, fabric.device, cfg)
    image_shape = (int(plan.meta["in_channels"]), int(plan.meta["img_resolution"]), int(plan.meta["img_resolution"]))
    batch_size = cfg.batch_size
    if batch_size == "auto":  # the counts do not depend on it: only the speed does
        rows = rows_per_sample(float(cfg.guidance), plan.uncond, int(plan.meta["label_dim"]))
        batch_size = probe_batch_size(net, image_shape, rows, fabric.device)
        if world > 1:  # every rank must slice the indices alike: the smallest rank's fit
            batch_size = int(fabric.all_gather(torch.tensor(batch_size, device=fabric.device)).min())
        batch_size = min(batch_size, -(-n // world))  # no larger than a rank's share of a row
        if writer:
            print(f"biasamp.count: batch_size=auto: {batch_size} samples per forward on {fabric.device}")
    batch_size = int(batch_size)
    setup = CountSetup(
        net=net, oracle=oracle, sampler=_plain(cfg.sampler), guidance=float(cfg.guidance),
        guidance_uncond=plan.uncond, guidance_interval=plan.interval, seed=int(cfg.seed),
        label_dim=int(plan.meta["label_dim"]),
        image_shape=image_shape, device=fabric.device,
        pad_to=min(batch_size, n) if getattr(net, "compile", False) else None,
    )
    lock = _job_lock(job_dir) if writer else contextlib.nullcontext()
    with lock:
        bar = tqdm(total=todo, unit="img", desc=job_dir.name.split("__")[-1], disable=not writer or todo == 0,
                   dynamic_ncols=True, file=sys.stderr)

        def on_batch(state: CountState, n_new: int) -> None:
            if writer:
                state.save(job_dir)
                bar.update(n_new)

        def reduce(delta: np.ndarray) -> np.ndarray:
            if world == 1:
                return delta
            return fabric.all_reduce(torch.from_numpy(delta).to(fabric.device), reduce_op="sum").cpu().numpy()

        stats = run_rows(setup, state, plan.rows, n, batch_size, rank=fabric.global_rank, world=world,
                         reduce=reduce, on_batch=on_batch)
        bar.close()
        if not writer:
            return None
        state.save(job_dir)
        return _write_outputs(cfg, plan, setup, state, stats, job_dir, sweep_dir, world, batch_size)


def rows_per_sample(guidance: float, uncond: str, label_dim: int) -> int:
    """Network rows per sample in one guided forward: cond; + null; or + every class (class_mean)."""
    return 1 if guidance == 0 else 2 if uncond == "null" else label_dim + 1


def _oracle_name(path: Any) -> str:
    """An oracle checkpoint's short name: its folder (runs/oracles/<name>/oracle.ckpt), else its file stem."""
    p = Path(str(path))
    return p.parent.name if p.name == "oracle.ckpt" and p.parent.name else p.stem


def data_rho(meta: dict[str, Any], attribute: str, n_attributes: int) -> float:
    """The training data's rho for one oracle attribute: the dataset summary's per-attribute value, else (one
    attribute) the checkpoint's rho_data. A missing attribute is an error, never a silent fallback."""
    by_attribute = (meta.get("data") or {}).get("rho_by_attribute") or {}
    if attribute in by_attribute:
        return float(by_attribute[attribute])
    if n_attributes == 1 and len(by_attribute) <= 1:
        return float(meta["rho_data"])
    raise ValueError(f"the oracle's attribute {attribute!r} is not a bias attribute of the checkpoint's dataset "
                     f"({sorted(by_attribute)}); use an oracle for that dataset")


def _write_outputs(cfg: DictConfig, plan: Plan, setup: CountSetup, state: CountState, stats: Any,
                   job_dir: Path, sweep_dir: Path, world: int, batch_size: int) -> dict[str, Any]:
    row_names = [r.name for r in plan.rows]
    attributes, values = list(setup.oracle.attributes), [list(v) for v in setup.oracle.value_names]
    table = counts_table(state, row_names, attributes, values)
    write_counts(job_dir, table)
    if cfg.export_matrix:
        write_matrices(job_dir, table, attributes, values, row_names, cfg.export_matrix)
    if cfg.save_grid and cfg.grid_per_class > 0 and not (job_dir / "grid.png").is_file():
        _save_grid(setup, plan.rows, int(cfg.grid_per_class), job_dir / "grid.png")

    class_names = [str(c) for c in plan.meta["class_names"]]
    level = float(cfg.ci_level)
    fidelity = None
    if CLASS_PRED in attributes:  # the class classifier's column: class fidelity, not a bias attribute
        fidelity = rho_model_from_counts(table, class_names, class_names, CLASS_PRED, level=level)
        values = [v for a, v in zip(attributes, values, strict=True) if a != CLASS_PRED]
        attributes = [a for a in attributes if a != CLASS_PRED]
    rho_data = {a: data_rho(plan.meta, a, len(attributes)) for a in attributes}
    est = {a: rho_model_from_counts(table, class_names, v, a, level=level)
           for a, v in zip(attributes, values, strict=True)}
    est_valid = {a: rho_model_from_counts(table, class_names, v, a, level=level, valid_only=True)
                 for a, v in zip(attributes, values, strict=True)}
    fidelity_cols = {} if fidelity is None else {
        "class_fidelity": fidelity.rho_model, "class_fidelity_low": fidelity.ci_low,
        "class_fidelity_high": fidelity.ci_high, "class_fidelity_n": fidelity.n,
        "class_fidelity_k": fidelity.n_aligned}
    n_invalid = int(table.loc[~table["valid"].astype(bool) & (table["class"] != UNCOND), "count"].sum())
    nfe = stats.nfe_per_image
    if not math.isfinite(nfe):  # nothing sampled in this session (only files were missing): keep the old figure
        old = job_dir / "meta.json"
        nfe = json.loads(old.read_text()).get("nfe_per_image", nfe) if old.is_file() else nfe
    sampler = _plain(cfg.sampler)
    summary = "; ".join(
        f"{a}: rho_model={est[a].rho_model:.4f} [{est[a].ci_low:.4f}, {est[a].ci_high:.4f}] rho_data={rho_data[a]:.4f}"
        for a in attributes)
    if fidelity is not None:
        summary += f"; class fidelity={fidelity.rho_model:.4f} [{fidelity.ci_low:.4f}, {fidelity.ci_high:.4f}]"
    summary = (f"biasamp.count: {job_dir.name}: {summary} ({int(level * 100)}% CP, n={est[attributes[0]].n}, "
               f"invalid={n_invalid}) {stats.images_per_s:.1f} img/s, {nfe:g} NFE/img")
    if stats.steady_images_per_s is not None:  # where compile time goes: the first batch, then the warm speed
        summary += f" (first batch {stats.first_batch_s:.1f} s, then {stats.steady_images_per_s:.1f} img/s)"
    meta = {
        "checkpoint": str(plan.checkpoint),
        "checkpoint_sha256": plan.checkpoint_sha256,
        "run": ckpt_name(plan.checkpoint),
        "n_img_trained": plan.meta["n_img"],
        "dataset": plan.meta["config"]["dataset"],
        "dataset_summary": plan.meta.get("data"),
        "rho_data": rho_data[attributes[0]],
        "rho_data_by_attribute": rho_data,
        "class_names": class_names,
        "model": plan.meta["config"]["model"].get("name"),
        "sampler": sampler,
        "guidance": float(cfg.guidance),
        "guidance_uncond": plan.uncond,
        "guidance_interval": list(plan.interval) if plan.interval else None,
        "oracle": {**_plain(cfg.oracle), "attributes": list(setup.oracle.attributes),
                   "value_names": [list(v) for v in setup.oracle.value_names], "confusion": setup.oracle.confusion},
        "class_oracle": None if fidelity is None else {
            "checkpoint": str(cfg.class_oracle), "confusion": getattr(setup.oracle, "class_confusion", None),
            **fidelity_cols},
        "seed": int(cfg.seed),
        "n_per_class": int(cfg.n_per_class),
        "rows": [{"name": r.name, "class_index": r.class_index, "sample_index_range": [0, state.done[r.name]]}
                 for r in plan.rows],
        "nfe_per_image": nfe,
        "wall_time_s": stats.seconds,
        "images_this_session": stats.images,
        "images_per_s": stats.images_per_s if stats.images else None,
        "first_batch_s": stats.first_batch_s,  # includes compile / CUDA-graph capture of a fresh denoiser
        "steady_images_per_s": stats.steady_images_per_s,  # after the first batch
        "batch_size": batch_size,
        "world_size": world,
        "device": str(setup.device),
        "versions": _versions(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rho_model": est[attributes[0]].rho_model,
        "rho_model_by_attribute": {a: est[a].rho_model for a in attributes},
        "summary": summary,
    }
    atomic_write_json(job_dir / "meta.json", meta)
    rows = [{
        "job_dir": job_dir.name,
        "run": meta["run"],
        "checkpoint": str(plan.checkpoint),
        "dataset": meta["dataset"]["name"],
        "attribute": a,
        "rho_data": rho_data[a],
        **_flat("sampler", sampler),
        "guidance": float(cfg.guidance),
        "guidance_uncond": plan.uncond,
        "guidance_interval": json.dumps(meta["guidance_interval"]) if plan.interval else "",
        "oracle": _plain(cfg.oracle)["name"],
        "class_oracle": _oracle_name(cfg.class_oracle) if cfg.get("class_oracle") else "",
        "seed": int(cfg.seed),
        "n_per_class": int(cfg.n_per_class),
        "n": est[a].n,
        "n_aligned": est[a].n_aligned,
        "rho_model": est[a].rho_model,
        "ci_low": est[a].ci_low,
        "ci_high": est[a].ci_high,
        "ci_method": est[a].ci_method,
        "ci_level": est[a].ci_level,
        "delta": est[a].rho_model - rho_data[a],
        "n_invalid": n_invalid,
        "rho_model_valid": est_valid[a].rho_model,
        **fidelity_cols,
        "nfe": nfe,
        "images_per_s": meta["images_per_s"],
    } for a in attributes]
    update_results(sweep_dir / "results.csv", rows)
    print(summary)
    return meta


def _save_grid(setup: CountSetup, rows: list[Row], per_row: int, path: Path) -> None:
    from torchvision.utils import make_grid, save_image

    images = grid_images(setup, rows, per_row)
    buf = io.BytesIO()
    save_image(make_grid((images + 1) / 2, nrow=per_row, padding=2, pad_value=1.0), buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


@hydra.main(version_base="1.3", config_path="conf", config_name="count")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
