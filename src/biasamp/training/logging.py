"""Metrics as CSV that survive resumes: ``<run_dir>/logs/metrics.csv``, one row per logging step.

Lightning's CSV logger deletes an existing metrics.csv when it starts; a resumed run would lose its curve. This
logger keeps the file: on a resume, rows logged after the checkpoint being resumed (steps that will be trained
again) are dropped once, then new rows are appended. Columns: ``step`` plus every logged metric (``n_img``,
``train/loss``, ...), as Lightning writes them.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from biasamp.atomic import atomic_write_text

METRICS_CSV = "metrics.csv"


def keep_rows_until(path: Path, last_step: int) -> int:
    """Rewrite metrics.csv keeping rows with ``step <= last_step``; returns the number of rows kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) <= last_step]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())
    return len(rows)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing file; it takes the file's header as its
    columns so that appended rows line up."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def log_hparams(self, params: dict[str, Any]) -> None:  # run.yaml holds them
        return None


class MetricsCSVLogger(CSVLogger):
    """A CSVLogger writing ``<save_dir>/<name>/metrics.csv`` that appends across resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
