"""Checkpoints: kept ones every ``ckpt_every_kimg``, a snapshot overwritten every ``snapshot_every_min``,
atomic writes, and finding the checkpoint to resume from.

Files in ``<run_dir>/checkpoints/``:
- ``ckpt-<n_img:010d>.ckpt``: kept, one per ``ckpt_every_kimg`` and one at the end of training;
- ``snapshot.ckpt``: the most recent time-based snapshot, overwritten.
Every file is written to ``<name>.tmp`` and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L

from biasamp.checkpoints import latest_checkpoint

SNAPSHOT_NAME = "snapshot.ckpt"


def kept_name(n_img: int) -> str:
    """File name of a kept checkpoint: the images seen, zero-padded so names sort by n_img."""
    return f"ckpt-{n_img:010d}.ckpt"


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one with the most images seen in ``ckpt_dir``, or None."""
    return latest_checkpoint(ckpt_dir)


class CheckpointCallback(L.Callback):
    """Writes kept checkpoints every ``ckpt_every_kimg`` and a snapshot every ``snapshot_every_min``.

    All ranks call ``trainer.save_checkpoint`` together (it is collective under DDP); rank 0 writes the
    file and renames it into place. The time-based decision is taken on rank 0 and broadcast, so every
    rank agrees on it.
    """

    def __init__(self, dirpath: str | Path, ckpt_every_kimg: float, snapshot_every_min: float) -> None:
        if ckpt_every_kimg <= 0:
            raise ValueError(f"callbacks.checkpoint.ckpt_every_kimg must be > 0, got {ckpt_every_kimg}")
        if snapshot_every_min <= 0:
            raise ValueError(f"callbacks.checkpoint.snapshot_every_min must be > 0, got {snapshot_every_min}")
        self.dirpath = Path(dirpath)
        self.ckpt_every_img = int(round(ckpt_every_kimg * 1000))
        self.snapshot_every_s = snapshot_every_min * 60.0
        self._last_snapshot = time.monotonic()
        self._last_kept_n_img: int | None = None

    def _save(self, trainer: L.Trainer, name: str, n_img: int) -> None:
        final = self.dirpath / name
        tmp = final.with_name(final.name + ".tmp")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, final)
        trainer.strategy.barrier("biasamp_checkpoint")
        if name != SNAPSHOT_NAME:
            self._last_kept_n_img = n_img

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_snapshot = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if getattr(pl_module, "_micro_in_step", 0) != 0:
            return
        n_img = int(pl_module.n_img)
        batch_total = int(pl_module.batch_total)
        # a kept checkpoint when this step crossed a multiple of ckpt_every_img
        if n_img // self.ckpt_every_img > (n_img - batch_total) // self.ckpt_every_img:
            self._save(trainer, kept_name(n_img), n_img)
        due = time.monotonic() - self._last_snapshot >= self.snapshot_every_s
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due:
            self._save(trainer, SNAPSHOT_NAME, n_img)
            self._last_snapshot = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n_img = int(pl_module.n_img)
        if self._last_kept_n_img != n_img and n_img > 0:  # the final state is always kept
            self._save(trainer, kept_name(n_img), n_img)
