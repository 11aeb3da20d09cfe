"""Folder names of count sweeps and count jobs.

- A **sweep folder** (``paths.output_dir/count/<sweep_name>``) holds one results.csv and a folder per job. Its
  default name is ``<run folder>-<checkpoint stem>`` of the checkpoint given, e.g.
  ``quickstart_rho0.9_seed0-1a2b3c4d-ckpt-0000040000`` (a run folder names its latest checkpoint).
- A **job folder** is ``<readable>-<hash>``: the readable part shows the settings users sweep (sampler name,
  EDM solver, steps and churn, guidance w, ``bf16`` when not fp32, ``fid`` with a class oracle), the hash is the
  job identity's (biasamp.counting.plan), which holds the checkpoint's sha256 and not its path: the same
  checkpoint under the same settings gets the same job folder name wherever the checkpoint file lives.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from biasamp.identity import folder_name, safe_folder_part


def sweep_name(checkpoint: Any) -> str:
    """The default sweep folder name of a checkpoint argument; never raises (it runs while Hydra names the
    folder, before the checkpoint is checked: a bad one is refused afterwards and its folder removed)."""
    if checkpoint is None or str(checkpoint) in ("", "???"):
        return "no_checkpoint"
    path = Path(str(checkpoint)).expanduser()
    if path.is_dir():
        from biasamp.checkpoints import resolve_checkpoint  # imports torch: only when a folder must be resolved
        from biasamp.errors import UsageError

        try:
            path = resolve_checkpoint(path)
        except UsageError:
            return safe_folder_part(path.name)
    path = path.resolve()  # through the runs/train/<readable> link: the run folder's own name, with its hash
    run = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return safe_folder_part(f"{run}-{path.stem}" if run else path.stem)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, numbers.Real) else str(value)


def job_folder_name(sampler: Mapping[str, Any], guidance: float, precision: str, class_oracle: bool,
                    identity: Mapping[str, Any], steer: str | None = None) -> str:
    """``<sampler>[-<solver>]-steps<N>[-churn<S>]-w<w>[-<steer>][-bf16][-fid]-<identity hash>`` (steer: e.g.
    ``steer-uniform-s1000-B100``)."""
    parts = [str(sampler["name"])]
    if sampler["name"] == "edm":
        parts += [str(sampler["solver"]), f"steps{sampler['num_steps']}", f"churn{_number(sampler['s_churn'])}"]
    else:
        parts.append(f"steps{sampler['num_steps']}")
    parts.append(f"w{_number(guidance)}")
    if steer:
        parts.append(steer)
    if precision != "fp32":
        parts.append(precision)
    if class_oracle:
        parts.append("fid")
    return folder_name("-".join(parts), identity)
