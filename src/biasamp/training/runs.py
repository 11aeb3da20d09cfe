"""A training run's identity, its folder name, and its two files: run.yaml and train_summary.json.

The identity is every resolved setting that changes the trained weights. The keys below do not (where the
files live, logging, checkpoint cadence, speed switches, how the global batch is split over devices and
accumulation rounds, when to stop early) and are left out; everything else is in, so a new setting is part of
the identity until it is added here. ``rho`` is left out because it acts only through ``dataset.rho`` (or
``dataset.rho_left``/``rho_right``), which are in.

Devices, ``batch_gpu`` and the thread count change the random draws of a run (noise is drawn per rank and
micro-batch) but not the experiment; a run may be resumed on other devices, and is then no longer bitwise equal
to an uninterrupted one.

Folder: ``<paths.output_dir>/train/<readable>-<hash>``, readable = ``name`` when given, else
``<dataset>_<model>_rho<dataset rho>_seed<seed>``. Beside it, the link ``<readable>`` points at the run of that
readable name started (or resumed, or found finished) last, so ``checkpoint=runs/train/quickstart_rho0.9_seed0``
names the run a script or a user just trained; the count app records the real folder and the checkpoint's sha256.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from biasamp.atomic import atomic_write_json, atomic_write_text
from biasamp.identity import folder_name, identity

TRAIN_ALLOW = (
    "name", "resume", "ckpt_path", "paths", "logger", "callbacks.checkpoint", "speed", "data",
    "threads", "rho",
    "log_every_n_steps", "ema_loss_every_n_steps", "max_nonfinite_steps", "batch_gpu",
    "dataset.data_dir", "dataset.download",
    "trainer._target_", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.benchmark", "trainer.enable_progress_bar", "trainer.max_time",
    "invdiff.base", "invdiff.groups",  # InvDiff: the files enter the identity by their sha256 (training.invdiff)
)
RUN_YAML = "run.yaml"
SUMMARY_JSON = "train_summary.json"


def plain_settings(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as plain data, without the keys that would resolve through Hydra's runtime
    (``paths``, ``logger``, ``callbacks.checkpoint``: allow-listed, so the identity never needs them). Other
    callbacks (a user's ``+callbacks.swa=...``) can change the weights and stay in."""
    skip = ("paths", "logger", "hydra")
    if not OmegaConf.is_config(cfg):
        out = {k: v for k, v in dict(cfg).items() if k not in skip}
        if isinstance(out.get("callbacks"), Mapping):
            out["callbacks"] = {k: v for k, v in out["callbacks"].items() if k != "checkpoint"}
        return {k: v for k, v in out.items() if not (k == "callbacks" and not v)}
    out = {}
    for key in cfg:
        if key in skip:
            continue
        if key == "callbacks":
            node = cfg[key] or {}
            extra = {k: OmegaConf.to_container(node[k], resolve=True) if OmegaConf.is_config(node[k]) else node[k]
                     for k in node if k != "checkpoint"}
            if extra:
                out[key] = extra
            continue
        node = cfg._get_node(key)
        out[key] = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(node) else cfg[key]
    return out


def train_identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The flat identity of a training config (plain data)."""
    return identity(settings, TRAIN_ALLOW)


def _rho_part(dataset: Mapping[str, Any]) -> str:
    def one(value: Any) -> str:
        if value is None:
            return "asis"  # rho=null: the dataset's split as it is
        if isinstance(value, list | tuple):
            return "-".join(one(v) for v in value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    if "rho_left" in dataset or "rho_right" in dataset:
        left, right = one(dataset.get("rho_left")), one(dataset.get("rho_right"))
        return left if left == right else f"{left}_{right}"
    return one(dataset.get("rho"))


def readable_name(settings: Mapping[str, Any]) -> str:
    """``name`` when given, else ``<dataset>_<model>_rho<rho>_seed<seed>`` with the dataset's own rho."""
    if settings.get("name") is not None:
        return str(settings["name"])
    dataset = settings.get("dataset") or {}
    model = settings.get("model") or {}
    return f"{dataset.get('name')}_{model.get('name')}_rho{_rho_part(dataset)}_seed{settings.get('seed')}"


def run_folder_name(settings: Mapping[str, Any]) -> str:
    """``<readable>-<identity hash>``."""
    return folder_name(readable_name(settings), train_identity(settings))


def _folder_resolver(*, _root_: DictConfig) -> str:
    """``${biasamp_run_folder:}``: the run folder's name, computed from the whole config while Hydra makes the
    output folder. It never raises (a bad value would otherwise end in Hydra's traceback): the app's checks
    refuse the value afterwards and remove the folder."""
    try:
        from biasamp.training.invdiff import resolve_invdiff

        return run_folder_name(resolve_invdiff(plain_settings(_root_)))
    except Exception:  # noqa: BLE001 - reported by the config checks, with the key
        return "invalid-config"


OmegaConf.register_new_resolver("biasamp_run_folder", _folder_resolver, replace=True)


def point_latest_link(run_dir: Path, readable: str) -> Path | None:
    """Make ``<run_dir's parent>/<readable>`` a symbolic link to ``run_dir`` (replaced atomically). A real folder
    of that name (from an older biasamp) is left alone; returns the link, or None."""
    run_dir = Path(run_dir)
    link = run_dir.parent / readable
    if link.name == run_dir.name or (link.exists() and not link.is_symlink()):
        return None
    tmp = run_dir.parent / f".{readable}.link.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)
    return link


# ------------------------------------------------------------------------------------------- run.yaml
def write_run_yaml(run_dir: Path, metadata: Mapping[str, Any]) -> None:
    """run.yaml: the checkpoint metadata as YAML (resolved config, dataset summary, identity, target)."""
    atomic_write_text(Path(run_dir) / RUN_YAML, OmegaConf.to_yaml(OmegaConf.create(dict(metadata))))


def read_run_yaml(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((Path(run_dir) / RUN_YAML).read_text())


# ------------------------------------------------------------------------------------------- train_summary.json
STOPPED_BY = ("target", "signal", "max_time", "other")


@dataclass
class TrainSummary:
    """train_summary.json: what the last session of a run did and where the run stands."""

    run_dir: str
    finished: bool  # n_img reached target_img
    stopped_by: str  # one of STOPPED_BY: target | signal (SIGTERM/SIGINT) | max_time | other
    n_img: int
    target_img: int
    global_step: int
    world_size: int
    batch_total: int
    rho_data: float
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per-rank weight sums and RNG digests

    def write(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / SUMMARY_JSON, asdict(self))

    @classmethod
    def read(cls, run_dir: Path) -> TrainSummary:
        import json

        return cls(**json.loads((Path(run_dir) / SUMMARY_JSON).read_text()))
