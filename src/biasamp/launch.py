"""Hydra + multi-process launching (Lightning DDP for training, Fabric for counting).

Lightning's launchers start the extra processes by re-running ``sys.argv`` with ``hydra.run.dir`` pinned.
Two things go wrong under a Hydra multirun, and are fixed here:
- ``sys.argv`` holds the whole sweep (``-m rho=0.9,0.99``), so every extra process would start the sweep
  again: :func:`prepare_relaunch` gives them this job's own overrides instead;
- the launcher leaves its variables (``LOCAL_RANK``...) in the main process, so the next job would believe
  it is a worker and wait forever: :func:`ddp_job` restores them and ends the process group after each job.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_child_rank() -> bool:
    """True in every process but global rank 0: the extra processes Lightning's launcher started (LOCAL_RANK,
    NODE_RANK), torchrun's (RANK), and SLURM's tasks of a multi-task job step (SLURM_PROCID), which each run the
    app themselves. Only rank 0 locks the folder and decides."""
    def rank(key: str) -> int:
        try:
            return int(os.environ.get(key, "0"))
        except ValueError:
            return 0

    slurm = rank("SLURM_PROCID") if rank("SLURM_NTASKS") > 1 else 0
    return rank("LOCAL_RANK") > 0 or rank("NODE_RANK") > 0 or rank("RANK") > 0 or slurm > 0


def prepare_relaunch() -> None:
    """Under a multirun, make ``sys.argv`` re-run only this job, in this job's output folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]


@contextlib.contextmanager
def ddp_job() -> Iterator[None]:
    """Run one (possibly multi-process) job and leave the main process clean for the next one."""
    saved = {k: os.environ.get(k) for k in DDP_ENV_KEYS}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
