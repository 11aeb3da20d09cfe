"""``state.json``: the persisted state of a count job, its one reader and writer.

The job folder's ``state.json`` holds the job's identity (the flat mapping its folder hash is made from), the
count shape, and per row (a class name, or ``uncond``) the number of samples done (indices 0..done-1) and the
count array over (value of each attribute..., valid), flattened; also the batch size the job samples with
(``batch_size=auto`` keeps it across resumes) and the network evaluations per image. It is rewritten
atomically after every batch, so a killed job loses at most the batch in flight. It is the job's source of
truth: counts.csv, meta.json and the job's results.csv rows are rebuilt from it.

Keys (``STATE_KEYS``): ``identity``, ``shape``, ``done``, ``counts``, ``batch_size``, ``nfe_per_image``.
Torch-free: the report reads it to check counts.csv.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biasamp.atomic import atomic_write_text
from biasamp.errors import UsageError

STATE_NAME = "state.json"
STATE_KEYS = ("identity", "shape", "done", "counts", "batch_size", "nfe_per_image")


@dataclass
class CountState:
    identity: Mapping[str, Any]  # the job's flat identity (biasamp.identity), or any label in tests
    shape: tuple[int, ...]  # (V_1, ..., V_A, 2): values per attribute, then valid (0: invalid, 1: valid)
    done: dict[str, int] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    batch_size: int | None = None  # samples per forward per device the job runs with (None: not sampled yet)
    nfe_per_image: float | None = None  # denoiser evaluations per image (None: not sampled yet)

    def row(self, name: str) -> np.ndarray:
        if name not in self.counts:
            self.counts[name] = np.zeros(self.shape, dtype=np.int64)
            self.done[name] = 0
        return self.counts[name]

    def add(self, name: str, delta: np.ndarray, done: int) -> None:
        self.row(name)
        self.counts[name] = self.counts[name] + delta.reshape(self.shape).astype(np.int64)
        self.done[name] = int(done)

    def to_json(self) -> dict[str, Any]:
        values = (dict(self.identity) if isinstance(self.identity, Mapping) else self.identity, list(self.shape),
                  dict(self.done), {k: v.reshape(-1).tolist() for k, v in self.counts.items()}, self.batch_size,
                  self.nfe_per_image)
        return dict(zip(STATE_KEYS, values, strict=True))

    def save(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / STATE_NAME, json.dumps(self.to_json(), indent=2, sort_keys=True,
                                                                 allow_nan=False) + "\n")


def _bad(path: Path, why: str) -> UsageError:
    return UsageError(f"{path} is not a count state written by biasamp.count ({why}); delete it to count this job "
                      "from the start (its counts are lost), or put back the file biasamp.count wrote")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_state(folder: Path) -> CountState | None:
    """The state saved in ``folder`` (None when it has none). A file that is not valid JSON (truncated), lacks
    or adds keys, or whose counts do not fit its shape or its done numbers raises UsageError naming it."""
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(path, f"not valid JSON: {err}") from None
    if not isinstance(raw, dict) or set(raw) != set(STATE_KEYS):
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise _bad(path, f"keys {keys}, expected {sorted(STATE_KEYS)}")
    shape, done, counts = raw["shape"], raw["done"], raw["counts"]
    if not isinstance(raw["identity"], dict):
        raise _bad(path, "identity is not a mapping")
    if not isinstance(shape, list) or len(shape) < 2 or not all(_whole(s) and s > 0 for s in shape) or shape[-1] != 2:
        raise _bad(path, f"shape {shape!r} is not [values per attribute..., 2]")
    if not isinstance(done, dict) or not isinstance(counts, dict) or set(done) != set(counts):
        raise _bad(path, "done and counts do not name the same rows")
    size = int(np.prod(shape))
    state = CountState(identity=raw["identity"], shape=tuple(shape))
    for name, flat in counts.items():
        if not isinstance(flat, list) or len(flat) != size or not all(_whole(c) for c in flat):
            raise _bad(path, f"row {name!r} does not hold {size} whole counts")
        if not _whole(done[name]) or sum(flat) != done[name]:
            raise _bad(path, f"row {name!r} counts {sum(flat)} samples but done says {done[name]!r}")
        state.counts[name] = np.asarray(flat, dtype=np.int64).reshape(shape)
        state.done[name] = int(done[name])
    batch_size, nfe = raw["batch_size"], raw["nfe_per_image"]
    if batch_size is not None and not (_whole(batch_size) and batch_size > 0):
        raise _bad(path, f"batch_size {batch_size!r} is not a positive integer")
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, int | float)):
        raise _bad(path, f"nfe_per_image {nfe!r} is not a number")
    state.batch_size, state.nfe_per_image = batch_size, nfe
    return state
