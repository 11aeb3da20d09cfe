"""``meta.json``: what a count job is and how it ran; its one writer and reader.

One JSON object with the keys of :class:`JobMeta` (``META_KEYS``): the checkpoint (path, sha256, run name,
images trained, whether it was finished and whether that was allowed), rho_data, the dataset and its summary,
the class names, the resolved sampler, guidance, h-space steering (mode, per-class targets, scale, block size,
heads file), oracle (options, attributes, value names, measured confusion)
and class oracle, the precision, seed, n per class and each row's sample-index range, the job's identity, NFE,
wall time, images/s, batch size, world size, device, library versions, rho_model and the printed summary.

JSON has no NaN or infinity: a NaN is written as ``null`` and an infinity as the string ``"inf"`` (``"-inf"``),
e.g. the EDM sampler's ``s_max``. Torch-free: the report reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biasamp.atomic import atomic_write_text
from biasamp.errors import UsageError

META_NAME = "meta.json"


@dataclass
class JobMeta:
    class_names: list[str]
    oracle: dict[str, Any]  # options + attributes, value_names, confusion: see oracle_entry
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_finished: bool | None = None
    allow_unfinished: bool | None = None
    run: str | None = None
    n_img_trained: int | None = None
    dataset: dict[str, Any] | None = None
    dataset_summary: dict[str, Any] | None = None
    rho_data: float | None = None
    rho_data_by_attribute: dict[str, float] | None = None
    model: str | None = None
    sampler: dict[str, Any] | None = None
    guidance: float | None = None
    guidance_uncond: str | None = None
    guidance_interval: list[float] | None = None
    class_oracle: dict[str, Any] | None = None  # see class_oracle_entry
    steering: dict[str, Any] | None = None  # h-space steering as resolved (counting.steering) + the heads path
    precision: str | None = None
    seed: int | None = None
    n_per_class: int | None = None
    rows: list[dict[str, Any]] | None = None  # see row_entry
    identity: dict[str, Any] | None = None
    identity_hash: str | None = None
    nfe_per_image: float | None = None
    wall_time_s: float | None = None
    images_this_session: int | None = None
    images_per_s: float | None = None
    first_batch_s: float | None = None  # includes compile / CUDA-graph capture of a fresh denoiser
    steady_images_per_s: float | None = None  # after the first batch
    batch_size: int | None = None
    world_size: int | None = None
    device: str | None = None
    versions: dict[str, str] | None = None
    finished_at: str | None = None
    rho_model: float | None = None
    rho_model_by_attribute: dict[str, float] | None = None
    summary: str | None = None

    @property
    def attributes(self) -> list[str]:
        return [str(a) for a in self.oracle["attributes"]]

    @property
    def value_names(self) -> list[list[str]]:
        return [[str(v) for v in values] for values in self.oracle["value_names"]]

    @property
    def row_names(self) -> list[str]:
        return [str(r["name"]) for r in self.rows or []]


META_KEYS = tuple(f.name for f in dataclasses.fields(JobMeta))
REQUIRED_KEYS = ("class_names", "oracle")


def row_entry(name: str, class_index: int | None, done: int) -> dict[str, Any]:
    """One entry of ``rows``: the row's name, its class index (None: unconditional), the indices counted."""
    return {"name": name, "class_index": class_index, "sample_index_range": [0, int(done)]}


def oracle_entry(options: Mapping[str, Any], attributes: Sequence[str], value_names: Sequence[Sequence[str]],
                 confusion: Any) -> dict[str, Any]:
    """``oracle``: its config options plus what it predicts and its measured confusion (or None)."""
    return {**options, "attributes": list(attributes), "value_names": [list(v) for v in value_names],
            "confusion": confusion}


def class_oracle_entry(checkpoint: str, confusion: Any, fidelity: Mapping[str, Any]) -> dict[str, Any]:
    """``class_oracle``: the target classifier's path, its confusion and the class-fidelity figures."""
    return {"checkpoint": checkpoint, "confusion": confusion, **fidelity}


def _finite(value: Any) -> Any:
    """``value`` with every NaN replaced by None (JSON null) and every infinity by "inf" or "-inf"."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None if math.isnan(value) else str(value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def meta_json(meta: JobMeta) -> dict[str, Any]:
    """The JSON object of ``meta`` (NaN as None, infinities as strings)."""
    return _finite(dataclasses.asdict(meta))


def write_meta(folder: Path, meta: JobMeta) -> None:
    text = json.dumps(meta_json(meta), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(Path(folder) / META_NAME, text)


def read_meta(folder: Path) -> JobMeta:
    """meta.json of a job folder. UsageError, naming the file, when it is missing, not JSON, or lacks what a
    reader needs (class names; oracle attributes and value names, one list per attribute). Unknown keys are
    ignored."""
    path = Path(folder) / META_NAME
    redo = "rerun that count job to write it again"
    if not path.is_file():
        raise UsageError(f"{path} not found; {redo}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}); {redo}") from None
    if not isinstance(raw, dict) or any(k not in raw for k in REQUIRED_KEYS):
        raise UsageError(f"{path} lacks key(s) {[k for k in REQUIRED_KEYS if k not in (raw or {})]}: not written "
                         f"by biasamp.count; {redo}")
    oracle = raw["oracle"]
    ok = (isinstance(oracle, dict) and isinstance(oracle.get("attributes"), list) and oracle["attributes"]
          and isinstance(oracle.get("value_names"), list) and len(oracle["value_names"]) == len(oracle["attributes"])
          and isinstance(raw["class_names"], list))
    if not ok:
        raise UsageError(f"{path}: class_names, oracle.attributes and oracle.value_names (one list per attribute) "
                         f"are not as biasamp.count writes them; {redo}")
    return JobMeta(**{k: v for k, v in raw.items() if k in META_KEYS})
