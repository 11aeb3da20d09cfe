"""One count job from config to files: check, plan, lock, resume, sample, write.

:func:`count_job` is what ``python -m biasamp.count`` runs. In order, each step before the next:

1. the config is checked (counting.schema) and the job planned from the checkpoint's metadata
   (counting.plan): a bad value stops here, before any job folder exists and before the model loads;
2. the job folder (``<sweep>/<readable>-<identity hash>``) is locked: a second process on the same job is
   refused with one line;
3. the state is read (state.json; a truncated or malformed one is refused) and must have this job's identity
   (else the differing keys are named). A job folder without a state first looks for the same job (same
   folder name, same identity: same checkpoint sha256 and settings) in the other sweep folders beside its own
   and continues from its counts: a copied or renamed run folder is not counted again. Rows already counted
   past ``n_per_class`` are refused: counts cannot be cut back;
4. with every sample counted, the files are checked against the state: all in place is "already complete";
   a lost or edited file (results.csv row, counts.csv, meta.json) is rewritten from the state, nothing sampled;
5. otherwise the model loads and only the missing sample indices are generated (Lightning Fabric splits them
   over devices), the state saved after every batch, and the files written.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from biasamp.apps import remove_empty_folders
from biasamp.atomic import atomic_write_bytes
from biasamp.checkpoints import load_denoiser
from biasamp.counting.job import CountSetup, Row, RunStats, grid_images, run_rows
from biasamp.counting.meta import JobMeta
from biasamp.counting.outputs import outputs_in_place, write_outputs
from biasamp.counting.plan import Plan, plan_job
from biasamp.counting.schema import check_count_config
from biasamp.counting.state import STATE_NAME, CountState, read_state
from biasamp.errors import UsageError
from biasamp.identity import describe, differences, folder_lock
from biasamp.launch import ddp_job, is_child_rank, prepare_relaunch

GRID_NAME = "grid.png"


def count_job(cfg: DictConfig, sweep_dir: Path) -> JobMeta | None:
    """Run the count job ``cfg`` names inside the sweep folder ``sweep_dir``; returns its meta (None on the
    ranks that do not write). Raises UsageError for what the user can fix, before any sampling."""
    plan = plan_job(check_count_config(cfg))
    job_dir = Path(sweep_dir).resolve() / plan.job_name
    with ddp_job():
        if is_child_rank():  # an extra Fabric process: its launcher holds the lock and made the decisions
            return _sample(plan, start_state(plan, job_dir, quiet=True), job_dir)
        existed = job_dir.exists()
        try:
            with folder_lock(job_dir, "a count job"):
                return _run_locked(plan, job_dir)
        except UsageError:
            if not existed:  # a refused new job leaves no folder behind (only its released lock was in it)
                remove_empty_folders(job_dir)
            raise


def _run_locked(plan: Plan, job_dir: Path) -> JobMeta | None:
    state = start_state(plan, job_dir)
    if any(state.done.get(r.name, 0) < plan.settings.n_per_class for r in plan.rows):
        return _sample(plan, state, job_dir)
    meta = outputs_in_place(plan, state, job_dir, job_dir.parent)
    if meta is not None:
        print(f"biasamp.count: {job_dir.name}: already complete, nothing to sample")
        print(meta.summary)
        return meta
    print(f"biasamp.count: {job_dir.name}: every sample is counted; rewriting its files and results.csv rows from "
          f"{STATE_NAME}, nothing sampled")
    if not (job_dir / STATE_NAME).is_file():
        state.save(job_dir)
    return write_outputs(plan, state, RunStats(), job_dir, job_dir.parent)


def _refuse_mismatch(plan: Plan, state: CountState, where: Path) -> None:
    diffs = differences(state.identity, plan.identity)
    if diffs:
        raise UsageError(f"{where} holds counts of another job: {describe(diffs, 'its state', 'this run')}; use "
                         "another sweep_name (or paths.output_dir), or delete that folder")


def _same_job_elsewhere(plan: Plan, job_dir: Path) -> tuple[CountState, Path] | None:
    """The most advanced state of this job (same folder name and identity) in a sibling sweep folder that
    can be continued (no row past n_per_class), or None."""
    best: tuple[CountState, Path] | None = None
    for path in sorted(job_dir.parent.parent.glob(f"*/{job_dir.name}/{STATE_NAME}")):
        if path.parent == job_dir:
            continue
        try:
            other = read_state(path.parent)
        except UsageError:  # a broken copy elsewhere is that job's problem, not this one's
            continue
        if other is None or differences(other.identity, plan.identity):
            continue
        if any(done > plan.settings.n_per_class for done in other.done.values()):
            continue
        if best is None or sum(other.done.values()) > sum(best[0].done.values()):
            best = (other, path.parent)
    return best


def start_state(plan: Plan, job_dir: Path, quiet: bool = False) -> CountState:
    """The job's state to continue from: its own state.json, else the same job's state in a sibling sweep
    folder, else a fresh one. Refuses another identity, and rows already counted past n_per_class."""
    shape = (*[len(v) for v in plan.oracle.value_names], 2)
    state = read_state(job_dir)
    if state is not None:
        _refuse_mismatch(plan, state, job_dir)
    else:
        found = _same_job_elsewhere(plan, job_dir)
        if found is None:
            return CountState(plan.identity, shape)
        state, source = found
        if not quiet:
            print(f"biasamp.count: {job_dir.name}: continuing from the counts of the same job (same checkpoint "
                  f"sha256 and settings) in {source}")
    if tuple(state.shape) != shape:
        raise UsageError(f"{job_dir / STATE_NAME} has count shape {list(state.shape)}, this job's oracle gives "
                         f"{list(shape)}; delete that file to count this job from the start")
    n = plan.settings.n_per_class
    over = {name: done for name, done in state.done.items() if done > n}
    if over:
        most = max(over.values())
        raise UsageError(f"n_per_class={n} is below the samples already counted in {job_dir} ({over}); counts "
                         f"cannot be cut back: use n_per_class>={most}, or another sweep_name for a smaller job")
    return state


def rows_per_sample(guidance: float, uncond: str, label_dim: int) -> int:
    """Network rows per sample in one guided forward: cond; + null; or + every class (class_mean)."""
    return 1 if guidance == 0 else 2 if uncond == "null" else label_dim + 1


# The last prepared denoiser of this process, by (checkpoint sha256, device, speed switches): the jobs of a
# multirun (one process, one job after another) over the same checkpoint reuse it, and with it its compiled
# graphs, so torch.compile's warm-up is paid once per sweep rather than once per setting.
_PREPARED: dict[tuple, Any] = {}


def prepared_denoiser(plan: Plan, device: Any) -> Any:
    """The checkpoint's EMA denoiser on ``device`` with the job's speed switches (loaded once per process)."""
    from biasamp.speed import fast_denoiser, resolve_switch

    s = plan.settings
    compile = s.compile
    if plan.steering is not None and resolve_switch("compile", compile, device):
        compile = False  # the h-space hook edits a block's output between Python calls: eager only
        print("biasamp.count: steer: torch.compile is off for a steered job (its h-space hook runs eagerly)")
    key = (plan.checkpoint_sha256, str(device), s.precision, str(s.channels_last), str(compile), s.compile_mode)
    if key not in _PREPARED:
        _PREPARED.clear()  # one checkpoint's weights at a time
        net, _ = load_denoiser(plan.checkpoint)
        _PREPARED[key] = fast_denoiser(net, device, precision=s.precision, channels_last=s.channels_last,
                                       compile=compile, compile_mode=s.compile_mode)
    return _PREPARED[key]


def steerer(plan: Plan, device: Any) -> Any:
    """The job's HSpaceSteerer (sampling.steering) on ``device``, or None for an unsteered job."""
    import torch

    from biasamp.sampling.steering import HSpaceSteerer

    st = plan.steering
    if st is None:
        return None
    window = tuple(st["sigma_window"]) if st["sigma_window"] else (0.0, float("inf"))
    targets = torch.tensor(st["targets"], dtype=torch.float32) if st["mode"] == "distribution" else None
    return HSpaceSteerer(plan.heads.heads().to(device), st["mode"], st["scale"], st["temperature"], window,
                         loss=st.get("loss", "chi2"), branches=st["branches"], targets=targets,
                         target_value=st.get("target_value"))


def _batch_size(plan: Plan, state: CountState, net: Any, fabric: Any, world: int, image_shape: tuple) -> int:
    """The configured batch size; for auto, the one the job started with, else the largest that fits."""
    import torch

    from biasamp.speed import probe_batch_size

    s = plan.settings
    if s.batch_size != "auto":
        return int(s.batch_size)
    if state.batch_size is not None:  # a resumed job keeps its batch size
        return int(state.batch_size)
    rows = rows_per_sample(s.guidance, s.guidance_uncond, int(plan.meta["label_dim"]))
    batch_size = probe_batch_size(net, image_shape, rows, fabric.device)
    if world > 1:  # every rank must slice the indices alike: the smallest rank's fit
        batch_size = int(fabric.all_gather(torch.tensor(batch_size, device=fabric.device)).min())
    batch_size = min(batch_size, -(-s.n_per_class // world))  # no larger than a rank's share of a row
    if fabric.is_global_zero:
        print(f"biasamp.count: batch_size=auto: {batch_size} samples per forward on {fabric.device}")
    return batch_size


def _sample(plan: Plan, state: CountState, job_dir: Path) -> JobMeta | None:
    import lightning as L  # here: a refused input or a finished job needs none of its 3 s import
    import numpy as np
    import torch
    from tqdm import tqdm

    s = plan.settings
    world = s.devices * s.num_nodes
    fabric = L.Fabric(accelerator=s.accelerator, devices=s.devices, num_nodes=s.num_nodes,
                      strategy="ddp" if world > 1 else "auto")
    prepare_relaunch()
    fabric.launch()
    writer = fabric.is_global_zero
    net = prepared_denoiser(plan, fabric.device)
    size = int(plan.meta["img_resolution"])
    image_shape = (int(plan.meta["in_channels"]), size, size)
    batch_size = state.batch_size = _batch_size(plan, state, net, fabric, world, image_shape)
    n = s.n_per_class
    setup = CountSetup(
        net=net, oracle=plan.oracle.to(fabric.device), sampler=plan.sampler, guidance=s.guidance,
        guidance_uncond=s.guidance_uncond, guidance_interval=s.guidance_interval, seed=s.seed,
        label_dim=int(plan.meta["label_dim"]), image_shape=image_shape, device=fabric.device,
        pad_to=min(batch_size, n) if getattr(net, "compile", False) else None,
        steerer=steerer(plan, fabric.device),
        block=int(plan.steering["batch"]) if plan.steering and plan.steering["mode"] == "distribution" else 1,
    )
    todo = sum(max(n - state.done.get(r.name, 0), 0) for r in plan.rows)
    bar = tqdm(total=todo, unit="img", desc=job_dir.name, disable=not (writer and s.progress), dynamic_ncols=True,
               file=sys.stderr)

    def on_batch(state: CountState, n_new: int) -> None:
        if writer:
            state.save(job_dir)
            bar.update(n_new)

    def reduce(delta: np.ndarray) -> np.ndarray:
        if world == 1:
            return delta
        return fabric.all_reduce(torch.from_numpy(delta).to(fabric.device), reduce_op="sum").cpu().numpy()

    stats = run_rows(setup, state, plan.rows, n, batch_size, rank=fabric.global_rank, world=world, reduce=reduce,
                     on_batch=on_batch)
    bar.close()
    if not writer:
        return None
    if stats.images:
        state.nfe_per_image = stats.nfe_per_image
    state.save(job_dir)
    if s.save_grid and s.grid_per_class > 0 and not (job_dir / GRID_NAME).is_file():
        _save_grid(setup, plan.rows, s.grid_per_class, job_dir / GRID_NAME)
    trace = None
    if setup.steerer is not None and stats.images:
        trace = setup.steerer.trace_table([str(c) for c in plan.meta["class_names"]])
    return write_outputs(plan, state, stats, job_dir, job_dir.parent, world=world, device=str(fabric.device),
                         steering_trace=trace)


def _save_grid(setup: CountSetup, rows: list[Row], per_row: int, path: Path) -> None:
    from torchvision.utils import make_grid, save_image

    images = grid_images(setup, rows, per_row)
    buf = io.BytesIO()
    save_image(make_grid((images + 1) / 2, nrow=per_row, padding=2, pad_value=1.0), buf, format="png")
    atomic_write_bytes(path, buf.getvalue())

