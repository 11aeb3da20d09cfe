"""A count job's plan: its checkpoint, rows, oracle, identity and folder name, decided before the model loads.

The **identity** of a job is everything that changes its counts, as a flat mapping (biasamp.identity): the
checkpoint's sha256 (not its path), the resolved sampler (every parameter, null sigmas as the model's), the
guidance scale, unconditional branch and interval, the oracle's resolved options (for oracle=classifier its
file's sha256, not its path), the class oracle's sha256, the resolved precision, the seed, the classes and
``include_uncond``. The settings in ``ALLOW`` change nothing in the counts and are left out; any other setting
of conf/count.yaml is part of the identity. The identity's hash names the job folder (counting.names), and the
identity is stored in state.json and meta.json: a job folder is only ever continued under the same identity.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from biasamp.checkpoints import ema_state_dict, load_checkpoint, metadata, resolve_checkpoint
from biasamp.counting.job import Row
from biasamp.counting.names import job_folder_name, sweep_name
from biasamp.counting.schema import CountSettings, check_against_checkpoint
from biasamp.counting.steering import resolve_steering, steer_folder_part
from biasamp.errors import UsageError
from biasamp.identity import identity
from biasamp.oracles import Oracle, build_oracle, with_class_prediction

# settings that do not change a job's counts (paths stand in for files whose sha256 is in the identity;
# ``paths``, where outputs go, is not in CountSettings.options at all)
ALLOW = ("checkpoint", "sweep_name", "n_per_class", "batch_size", "fabric", "compile", "compile_mode",
         "channels_last", "progress", "save_grid", "grid_per_class", "export_matrix", "ci_level", "allow_unfinished",
         "oracle.checkpoint", "class_oracle")
UNCOND = "uncond"
# DPM-Solver++(3M) as the references write it and EDM churn with skipped steps over the steps taken (2026-12):
# jobs of those settings carry this key in their identity, so a job folder counted before is not continued
SAMPLER_FORMULA = "2026-12"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The file's SHA-256 (hex); remembered per (path, size, mtime) within a process (a multirun hashes once)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def data_rho(meta: Mapping[str, Any], attribute: str, n_attributes: int,
             classes: Sequence[str] | None = None) -> float:
    """The training data's rho for one oracle attribute, as the mean over the counted classes of each class's own
    aligned share (``classes``: the class names counted; None: all of them).

    rho_model weights classes equally (every class row has n_per_class samples), so rho_data does too: then
    delta = rho_model - rho_data compares like with like even when classes differ in size or in rho (a per-class
    rho list, rho=null). The per-class shares come from the dataset summary (``rho_per_class_by_attribute``, or
    ``rho_per_class`` for one attribute); a checkpoint without them falls back to its pooled value. A missing
    attribute is refused (UsageError), never a silent fallback."""
    data = meta.get("data") or {}
    by_attribute = data.get("rho_by_attribute") or {}
    if attribute not in by_attribute and not (n_attributes == 1 and len(by_attribute) <= 1):
        raise UsageError(f"the oracle's attribute {attribute!r} is not a bias attribute of the checkpoint's dataset "
                         f"({sorted(by_attribute)}); use an oracle for that dataset")
    per_class = (data.get("rho_per_class_by_attribute") or {}).get(attribute)
    if per_class is None and n_attributes == 1:
        per_class = data.get("rho_per_class")
    names = [str(c) for c in data.get("class_names") or meta.get("class_names") or []]
    if per_class is not None and len(per_class) == len(names) and names:
        own = dict(zip(names, (float(r) for r in per_class), strict=True))
        wanted = [str(c) for c in classes] if classes is not None else names
        if all(c in own for c in wanted) and wanted:
            return math.fsum(own[c] for c in wanted) / len(wanted)  # fsum: 10 x 0.9 averages to 0.9
    if attribute in by_attribute:
        return float(by_attribute[attribute])
    return float(meta["rho_data"])


def _json_ready(value: Any) -> Any:
    """``value`` as it reads back from JSON: infinities as "inf"/"-inf" (the identity hash treats them alike)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


@dataclass
class Plan:
    """Everything a count job is, checked; nothing loaded but the checkpoint's metadata and the oracle."""

    settings: CountSettings
    checkpoint: Path  # resolved, absolute
    checkpoint_sha256: str
    run: str  # <run folder>-<checkpoint stem> of the checkpoint's current path
    meta: dict[str, Any]  # the checkpoint's metadata (biasamp.checkpoints.metadata)
    oracle: Oracle
    rows: list[Row]
    sampler: dict[str, Any]  # resolved
    identity: dict[str, Any]
    job_name: str
    steering: dict[str, Any] | None = None  # resolved (counting.steering), as in the identity; None: unsteered
    heads: Any = None  # the HeadsFile of a steered job


    @property
    def row_names(self) -> list[str]:
        return [r.name for r in self.rows]


def _oracle_identity(options: Mapping[str, Any], oracle: Oracle) -> dict[str, Any]:
    """The oracle's options as it resolved them (defaults filled in, colours in bias order), its file's sha256."""
    resolved = {**options, "attributes": list(oracle.attributes), "value_names": [list(v) for v in oracle.value_names]}
    for key in ("min_confidence", "max_distance"):
        if hasattr(oracle, key):
            resolved[key] = float(getattr(oracle, key))
    if options.get("name") == "colour":
        resolved["allowed_colours"] = list(oracle.value_names[0])
    if options.get("checkpoint"):
        resolved["checkpoint_sha256"] = sha256_file(options["checkpoint"])
    return resolved


def plan_job(settings: CountSettings) -> Plan:
    """Read the checkpoint's metadata, check the settings against it, build the oracle and the job identity.
    Raises UsageError for what the user can fix (the model itself is not built here)."""
    checkpoint = resolve_checkpoint(settings.checkpoint).resolve()
    ckpt = load_checkpoint(checkpoint)
    ema_state_dict(ckpt)  # refuses a checkpoint without EMA weights now, not after the job folder is made
    meta = metadata(ckpt)
    sampler = check_against_checkpoint(settings, meta, checkpoint)
    class_names = [str(c) for c in meta["class_names"]]
    rows = [Row(c, class_names.index(c)) for c in settings.classes or class_names]
    if settings.include_uncond:
        rows.append(Row(UNCOND, None))
    oracle = build_oracle(settings.oracle, meta)
    for attribute in oracle.attributes:  # each bias column needs the training data's rho (before any sampling)
        data_rho(meta, attribute, len(oracle.attributes), [r.name for r in rows if r.class_index is not None])
    oracle_identity = _oracle_identity(settings.oracle, oracle)
    sha = sha256_file(checkpoint)
    steering, heads = resolve_steering(settings.steer, meta, sha, sampler, list(oracle.attributes),
                                       [list(v) for v in oracle.value_names], settings.guidance,
                                       settings.guidance_uncond)
    if settings.class_oracle is not None:
        oracle = with_class_prediction(oracle, str(settings.class_oracle), meta)
    resolved = {
        **settings.options, "checkpoint_sha256": sha, "sampler": sampler, "guidance": settings.guidance,
        "guidance_uncond": settings.guidance_uncond, "oracle": oracle_identity,
        "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
        "class_oracle_sha256": sha256_file(settings.class_oracle) if settings.class_oracle else None,
        "precision": settings.precision, "classes": [r.name for r in rows if r.class_index is not None],
    }
    resolved.pop("steer", None)  # an unsteered job keeps the identity it had before steering existed
    if steering is not None:
        resolved["steer"] = steering
    revised = (sampler["name"] == "dpmpp" and sampler.get("order") == 3) or (
        sampler["name"] == "edm" and sampler.get("s_churn", 0) > 0 and sampler.get("n_skipped_steps", 0) > 0)
    if revised:  # these samplers' formulas changed (reference 3M; churn over N - n): never continue an older job
        resolved["sampler_formula"] = SAMPLER_FORMULA
    ident = _json_ready(identity(resolved, ALLOW))
    name = job_folder_name(sampler, settings.guidance, settings.precision, settings.class_oracle is not None, ident,
                           steer_folder_part(steering))
    return Plan(settings=settings, checkpoint=checkpoint, checkpoint_sha256=sha, run=sweep_name(checkpoint),
                meta=meta, oracle=oracle, rows=rows, sampler=sampler, identity=ident, job_name=name,
                steering=steering, heads=heads)
