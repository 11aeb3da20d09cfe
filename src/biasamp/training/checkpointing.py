"""Checkpoints: kept ones every ``ckpt_every_kimg``, a snapshot every ``snapshot_every_min`` and when the run is
asked to stop (SIGTERM, SIGINT), durable writes, and finding the checkpoint to resume from.

Files in ``<run_dir>/checkpoints/``:
- ``ckpt-<n_img:010d>.ckpt``: kept, one per ``ckpt_every_kimg``, and one when the run reaches its target;
- ``snapshot.ckpt``: the most recent snapshot, overwritten: every few minutes, on a stop signal, and when
  ``trainer.max_time`` is up (checked here, between optimizer steps, rather than by Lightning, which would stop
  inside a gradient-accumulation round).
Every file is written to ``<name>.tmp``, flushed to disk (fsync), renamed, and the folder fsynced, so a crash or
power loss never leaves a half-written checkpoint under a real name; a stale ``.tmp`` is removed at start.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L

from biasamp.checkpoints import latest_checkpoint

SNAPSHOT_NAME = "snapshot.ckpt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def kept_name(n_img: int) -> str:
    """File name of a kept checkpoint: the images seen, zero-padded so names sort by n_img."""
    return f"ckpt-{n_img:010d}.ckpt"


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the readable one with the most images seen in ``ckpt_dir``, or None."""
    return latest_checkpoint(ckpt_dir)


def remove_stale_temporaries(ckpt_dir: str | Path) -> list[Path]:
    """Delete ``*.tmp`` files a killed write left in ``ckpt_dir``; returns them."""
    ckpt_dir = Path(ckpt_dir)
    stale = sorted(ckpt_dir.glob("*.tmp")) if ckpt_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointCallback(L.Callback):
    """Writes kept checkpoints every ``ckpt_every_kimg``, a snapshot every ``snapshot_every_min``, and a snapshot
    then a clean stop when the process gets SIGTERM or SIGINT (``stop_signal`` records which).

    All ranks call ``trainer.save_checkpoint`` together (it is collective under DDP); rank 0 writes the file and
    renames it into place. The time-based and the stop decisions are taken on rank 0 and broadcast, so every rank
    agrees on them. Both happen only between optimizer steps, so a snapshot is an exact point to continue from.
    """

    def __init__(self, dirpath: str | Path, ckpt_every_kimg: float, snapshot_every_min: float) -> None:
        self.dirpath = Path(dirpath)
        self.ckpt_every_img = int(round(ckpt_every_kimg * 1000))
        self.snapshot_every_s = snapshot_every_min * 60.0
        self._last_snapshot = time.monotonic()
        self._last_kept_n_img: int | None = None
        self._pending_signal: int | None = None
        self.stop_signal: int | None = None  # the signal that stopped training, after fit
        self.max_time_s: float | None = None  # trainer.max_time in seconds (set by the app): stop at a step boundary
        self.stopped_by_time = False
        self._started = time.monotonic()
        self._previous_handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._pending_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now, without the snapshot
        self._pending_signal = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_snapshot = self._started = time.monotonic()
        self._pending_signal = self.stop_signal = None
        self.stopped_by_time = False
        # replaces Lightning's own SIGTERM handler for the time of fit (Lightning restores the earlier ones after)
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    # ---------------------------------------------------------------- writing
    def _save(self, trainer: L.Trainer, name: str, n_img: int) -> None:
        for logger in trainer.loggers:  # rows logged up to this step reach metrics.csv before the checkpoint does
            logger.save()
        final = self.dirpath / name
        tmp = final.with_name(final.name + ".tmp")
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            fsync_path(tmp)
            os.replace(tmp, final)
            fsync_path(self.dirpath)
        trainer.strategy.barrier("biasamp_checkpoint")
        if name != SNAPSHOT_NAME:
            self._last_kept_n_img = n_img

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if getattr(pl_module, "_micro_in_step", 0) != 0:
            return
        n_img = int(pl_module.n_img)
        batch_total = int(pl_module.batch_total)
        # a kept checkpoint when this step crossed a multiple of ckpt_every_img
        if n_img // self.ckpt_every_img > (n_img - batch_total) // self.ckpt_every_img:
            self._save(trainer, kept_name(n_img), n_img)
        now = time.monotonic()
        due = now - self._last_snapshot >= self.snapshot_every_s
        stop = self._pending_signal or 0
        timeout = self.max_time_s is not None and now - self._started >= self.max_time_s
        if trainer.world_size > 1:
            due, stop, timeout = trainer.strategy.broadcast((bool(due), int(stop), bool(timeout)), src=0)
        if (stop or timeout) and n_img < int(pl_module.total_img):
            self._save(trainer, SNAPSHOT_NAME, n_img)
            self.stop_signal = int(stop) or None
            self.stopped_by_time = not stop
            trainer.should_stop = True
        elif due:
            self._save(trainer, SNAPSHOT_NAME, n_img)
            self._last_snapshot = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n_img = int(pl_module.n_img)
        if n_img >= int(pl_module.total_img):  # the final state is always kept
            if self._last_kept_n_img != n_img:
                self._save(trainer, kept_name(n_img), n_img)
        elif self.stop_signal is None and not self.stopped_by_time and n_img > 0:  # ended early otherwise
            self._save(trainer, SNAPSHOT_NAME, n_img)
