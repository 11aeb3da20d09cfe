"""The persisted state of a count job: which sample indices are done and what they counted.

``state.json`` in the job folder holds, per row (a class name, or ``uncond``), the number of samples done
(indices 0..done-1) and the count array over (value of each attribute..., valid), flattened. It is rewritten
atomically after every batch, so a killed job loses at most the batch in flight, and the setting's
fingerprint guards against continuing a folder with different settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from biasamp.atomic import atomic_write_json

STATE_NAME = "state.json"


@dataclass
class CountState:
    fingerprint: str  # hash of everything that determines the samples and their labels
    shape: tuple[int, ...]  # (V_1, ..., V_A, 2): values per attribute, then valid (0: invalid, 1: valid)
    done: dict[str, int] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

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
        return {
            "fingerprint": self.fingerprint,
            "shape": list(self.shape),
            "done": dict(self.done),
            "counts": {k: v.reshape(-1).tolist() for k, v in self.counts.items()},
        }

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / STATE_NAME, self.to_json())

    @classmethod
    def load_or_new(cls, folder: Path, fingerprint: str, shape: tuple[int, ...]) -> CountState:
        """The saved state of ``folder``, or a fresh one. A state saved under another fingerprint is refused."""
        path = Path(folder) / STATE_NAME
        if not path.is_file():
            return cls(fingerprint=fingerprint, shape=tuple(shape))
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); delete it to start the job again") from err
        if raw.get("fingerprint") != fingerprint or tuple(raw.get("shape", ())) != tuple(shape):
            raise ValueError(
                f"{path.parent} holds counts of different settings (checkpoint, sampler, guidance, oracle, "
                "seed, precision or class oracle differ); use another paths.output_dir or sweep_name, or delete "
                "that folder"
            )
        state = cls(fingerprint=fingerprint, shape=tuple(shape))
        for name, flat in raw["counts"].items():
            state.counts[name] = np.asarray(flat, dtype=np.int64).reshape(shape)
            state.done[name] = int(raw["done"][name])
        return state
