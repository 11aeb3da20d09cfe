"""What every app does around its one library call: bad input as one line and exit 2, the CPU thread count,
and no folder left behind by a refused start.

An app's ``main`` is ``run_app("train", lambda: train_run(cfg), folder)``: a :class:`~biasamp.errors.UsageError`
becomes ``biasamp.<app>: error: <message>`` on stderr and exit status 2; every other exception keeps its
traceback (exit status 1). When the app was refused, the output folder Hydra made for it is removed again if
it holds nothing (so a bad value never leaves a folder named after it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from biasamp.errors import UsageError, one_line

T = TypeVar("T")


def fail(app: str, message: str, status: int = 2) -> None:
    """Print ``biasamp.<app>: error: <message>`` (one line) on stderr and exit."""
    print(f"biasamp.{app}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def remove_empty_folders(folder: Path, stop: Path | None = None) -> None:
    """Remove ``folder`` and then its parents while they are empty, up to (not including) ``stop`` (default: the
    working directory). Never removes a folder that holds anything but a (released) lock file."""
    from biasamp.identity import LOCK_NAME, remove_released_lock

    folder, stop = Path(folder).resolve(), Path(stop or Path.cwd()).resolve()
    while folder != stop and folder.is_relative_to(stop) and folder.is_dir():
        if [p.name for p in folder.iterdir()] == [LOCK_NAME] and not remove_released_lock(folder):
            return  # another process holds it: its folder, not ours to remove
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent


def run_app(app: str, work: Callable[[], T], folder: Path | None = None) -> T:
    """Run ``work``; on a UsageError print one line, remove ``folder`` if it is (still) empty, exit 2."""
    try:
        return work()
    except UsageError as err:
        if folder is not None:
            remove_empty_folders(folder)
        fail(app, str(err))
        raise AssertionError("unreachable") from None  # fail() exits


def available_cores() -> int:
    """CPU cores this process may actually use: its affinity mask (what taskset and SLURM allow), capped by a
    cgroup v2 CPU quota (what a container allows), at least 1. torch's own default counts the host's cores, which
    in a container with a quota of 2 CPUs can be dozens of threads fighting over 2."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cpu_threads(value: object, key: str = "threads") -> int:
    """The torch intra-op thread count for a CPU run: ``auto`` = :func:`available_cores` (at most 8), or a positive
    integer (``threads=1`` on a machine whose cores other processes keep busy). Raises UsageError otherwise."""
    if value == "auto":
        return min(available_cores(), 8)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{key}={value!r} is not allowed: a positive integer, or auto (the cores this process may "
                         f"use, at most 8; here {min(available_cores(), 8)})")
    return int(value)


def set_cpu_threads(value: object, key: str = "threads") -> int:
    """Set torch's intra-op threads for a CPU run (see :func:`cpu_threads`); returns the number set."""
    import torch

    n = cpu_threads(value, key)
    torch.set_num_threads(n)
    return n


def app_options(cfg: Any) -> dict[str, Any]:
    """A Hydra app's settings as plain data (nested configs resolved), without ``paths``."""
    from omegaconf import OmegaConf

    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "paths"}


def check_device(value: object, key: str = "device") -> None:
    """``device``: auto (cuda if available), cpu or cuda (refused without a CUDA GPU); UsageError otherwise."""
    if value not in ("auto", "cpu", "cuda"):
        raise UsageError(f"{key}={value!r} is not allowed: use auto, cpu or cuda")
    if value == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"{key}=cuda is not allowed: this machine has no CUDA GPU; use {key}=auto or cpu")


def app_device(value: str) -> Any:
    """The torch device of a checked ``device`` setting: cuda for cuda, and for auto when a GPU is there."""
    import torch

    return torch.device("cuda" if value == "cuda" or value == "auto" and torch.cuda.is_available() else "cpu")
