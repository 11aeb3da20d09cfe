"""``heads.pt``: the h-space attribute heads of one checkpoint, written by ``python -m biasamp.hspace`` and read
by the count app's steering (``steer=distribution`` / ``steer=sample``). This module is the format's one home.

A plain dict of tensors, strings and numbers (loadable with ``torch.load(..., weights_only=True)``):

- ``format``: ``FORMAT``;
- ``weight`` float32 (S, V, D), ``bias`` float32 (S, V): head s maps flattened h (D,) at noise level
  ``sigmas[s]`` to logits over the V values ``value_names`` of the bias attribute ``attribute``;
- ``sigmas``: the S noise levels (decreasing), the ones the sampler setting ``settings["sampler"]`` evaluates;
- ``accuracy``, ``worst_group_accuracy``, ``train_accuracy`` (S,): held-out accuracy (mean over the (class,
  value) groups: balanced), its worst group, and the balanced training accuracy of each head;
- ``class_names``, ``data_distribution`` (K, V): each class's share of each bias value in the training set (the
  ``data`` target of distribution guidance), ``rho_per_class`` (K,);
- ``checkpoint_sha256``: the diffusion model the heads were trained on (steering another model is refused);
- ``h_shape``: (C, r, r) of h; ``n_train``, ``n_heldout``: images per head; ``settings``: the app's settings;
- ``class_log_prior`` (K, V) or None: log of each class's share of each value among the model's own samples
  (``h_source=trajectory``, the oracle's labels), added to a class's logits when steering (the heads are fitted
  on a balanced resample; this turns their output into the posterior under the model's own prior).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from biasamp.atomic import atomic_write_bytes
from biasamp.errors import UsageError
from biasamp.safe_load import load_format_file
from biasamp.sampling.steering import LinearHeads

HEADS_NAME = "heads.pt"
FORMAT = "biasamp.hspace_heads/1"
OPTIONAL = {"class_log_prior"}  # absent in files written before it existed: None
HINT = "give the heads.pt written by python -m biasamp.hspace checkpoint=<the same checkpoint>"


@dataclass
class HeadsFile:
    weight: torch.Tensor
    bias: torch.Tensor
    sigmas: list[float]
    attribute: str
    value_names: list[str]
    class_names: list[str]
    data_distribution: list[list[float]]
    rho_per_class: list[float]
    accuracy: list[float]
    worst_group_accuracy: list[float]
    train_accuracy: list[float]
    checkpoint_sha256: str
    h_shape: list[int]
    n_train: int
    n_heldout: int
    settings: dict[str, Any] = field(default_factory=dict)
    class_log_prior: list[list[float]] | None = None

    def heads(self) -> LinearHeads:
        extra = None if self.class_log_prior is None else torch.tensor(self.class_log_prior, dtype=torch.float32)
        return LinearHeads(self.weight.to(torch.float32), self.bias.to(torch.float32),
                           torch.tensor(self.sigmas, dtype=torch.float64), extra)

    def save(self, path: str | Path) -> None:
        import io

        buf = io.BytesIO()
        torch.save({"format": FORMAT, **asdict(self)}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> HeadsFile:
        names = set(cls.__dataclass_fields__)
        data = load_format_file(path, "heads file", "biasamp h-space heads file", FORMAT, HINT, names, OPTIONAL)
        heads = cls(**{k: data[k] for k in names if k in data})
        s, v = len(heads.sigmas), len(heads.value_names)
        if tuple(heads.weight.shape[:2]) != (s, v) or tuple(heads.bias.shape) != (s, v):
            raise UsageError(f"heads file {path} has weight {tuple(heads.weight.shape)} and bias "
                             f"{tuple(heads.bias.shape)} for {s} sigmas and {v} values; {HINT}")
        prior = heads.class_log_prior
        if prior is not None and (len(prior) != len(heads.class_names) or any(len(r) != v for r in prior)):
            raise UsageError(f"heads file {path} has a class_log_prior that is not one row of {v} values per class "
                             f"({len(heads.class_names)}); {HINT}")
        return heads
