"""``groups.pt``: InvDiff's groups of one checkpoint's training images, written by ``python -m biasamp.invdiff_groups``
and read by the fine-tuning step. This module is the format's one home.

A plain dict of tensors, strings, numbers, lists and dicts (loadable with ``torch.load(..., weights_only=True)``):

- ``format``: ``FORMAT``;
- ``W`` float32 (N, K): image n's weight in each group, rows on the simplex (soft from the grouper, one-hot for
  ``source="true_labels"``);
- ``indices`` int64 (N,): each row's image index in the checkpoint's rebuilt training set
  (``build_dataset(meta["config"]["dataset"])``), also the index of its noise streams; ``labels`` int64 (N,): the
  class label of those images (a check that a later rebuild yields the same set);
- ``losses`` float64 (N,): the per-sample losses l_i of the frozen model (mitigation.invdiff.sample_losses);
- ``sigmas``: the fixed sigma set (increasing), empty in random mode; ``sigma_mode``: ``fixed`` or ``random``;
- ``checkpoint_sha256``: the model whose losses these are; ``dataset``: {``config``: the checkpoint's dataset
  config, ``n``: N};
- ``settings``: the app's settings; ``diagnostics``: mitigation.invdiff.grouper_diagnostics against the true bias
  labels (never used to fit); ``source``: ``grouper`` (label-free, InvDiff) or ``true_labels`` (the (class, bias
  value) groups: the upper-bound control).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from biasamp.atomic import atomic_write_bytes
from biasamp.errors import UsageError
from biasamp.safe_load import load_format_file

GROUPS_NAME = "groups.pt"
FORMAT = "biasamp.invdiff_groups/1"
SOURCES = ("grouper", "true_labels")
SIGMA_MODES = ("fixed", "random")
HINT = "give the groups.pt written by python -m biasamp.invdiff_groups checkpoint=<the same checkpoint>"


@dataclass
class GroupsFile:
    W: torch.Tensor
    indices: torch.Tensor
    labels: torch.Tensor
    losses: torch.Tensor
    sigmas: list[float]
    sigma_mode: str
    checkpoint_sha256: str
    dataset: dict[str, Any]
    source: str
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.W.shape[0])

    @property
    def K(self) -> int:
        return int(self.W.shape[1])

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        data.update(W=self.W.detach().to(torch.float32).cpu().contiguous(),
                    indices=self.indices.detach().to(torch.int64).cpu().contiguous(),
                    labels=self.labels.detach().to(torch.int64).cpu().contiguous(),
                    losses=self.losses.detach().to(torch.float64).cpu().contiguous())
        buf = io.BytesIO()
        torch.save({"format": FORMAT, **data}, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> GroupsFile:
        names = set(cls.__dataclass_fields__)
        data = load_format_file(path, "groups file", "biasamp InvDiff groups file", FORMAT, HINT, names)
        groups = cls(**{k: data[k] for k in names})
        groups._check(path)
        return groups

    def _check(self, path: str | Path) -> None:
        def bad(what: str) -> UsageError:
            return UsageError(f"groups file {path} {what}; {HINT}")

        tensors = {"W": self.W, "indices": self.indices, "labels": self.labels, "losses": self.losses}
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise bad(f"has {key} of type {type(value).__name__}, not a tensor")
        if self.W.ndim != 2 or self.W.shape[1] < 1:
            raise bad(f"has W of shape {tuple(self.W.shape)}, not (N, K)")
        n = self.n
        for key in ("indices", "labels", "losses"):
            if tuple(tensors[key].shape) != (n,):
                raise bad(f"has {key} of shape {tuple(tensors[key].shape)} for W of {n} rows")
        w = self.W.to(torch.float64)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or (
                n and float((w.sum(dim=1) - 1).abs().max()) > 1e-4):
            raise bad("has a W whose rows are not on the simplex (non-negative, summing to 1)")
        if self.source not in SOURCES:
            raise bad(f"has source {self.source!r}, not one of {SOURCES}")
        if self.sigma_mode not in SIGMA_MODES:
            raise bad(f"has sigma_mode {self.sigma_mode!r}, not one of {SIGMA_MODES}")
        if not isinstance(self.dataset, dict) or self.dataset.get("n") != n:
            raise bad(f"has a dataset identity {self.dataset!r} that does not give n = {n}")

    def check_source(self, checkpoint_sha256: str, dataset_config: dict[str, Any], n: int,
                     path: str | Path = "") -> None:
        """UsageError (one line) unless these groups were made for this checkpoint and its rebuilt training set."""
        where = f"groups file {path} " if path else "the groups "
        if checkpoint_sha256 != self.checkpoint_sha256:
            raise UsageError(f"{where}were made for another checkpoint (sha256 {self.checkpoint_sha256[:12]}..., "
                             f"this one is {checkpoint_sha256[:12]}...); {HINT}")
        if dict(dataset_config) != self.dataset.get("config") or int(n) != self.dataset.get("n"):
            raise UsageError(f"{where}were made for another training set (n = {self.dataset.get('n')}, config "
                             f"{self.dataset.get('config')!r}); {HINT}")
