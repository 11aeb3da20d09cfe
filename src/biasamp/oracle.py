"""Oracle training app: ``python -m biasamp.oracle dataset=<name> attribute=bias|target [rho=...]``.

Composes conf/oracle_train.yaml and calls :func:`biasamp.oracles.training.train_oracle`, which trains a
classifier on a balanced resample of the real data and writes ``oracle.ckpt`` and ``metrics.json`` with its
held-out confusion counts and accuracies. Bad input: one line on stderr, exit status 2, no folder left; any other
error keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biasamp.apps import run_app
from biasamp.oracles.training import CKPT_NAME, train_oracle


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (bad input: one line, exit 2, no folder left) and print one summary line."""
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    metrics = run_app("oracle", lambda: train_oracle(cfg, out_dir), out_dir)
    last = metrics["noise_accuracy"][-1] if metrics["noise_accuracy"] else None
    noise = f", accuracy at noise {last['sigma']:g}={last['accuracy']:.4f}" if last else ""
    print(f"biasamp.oracle: {metrics['attribute']} oracle: held-out accuracy={metrics['accuracy']:.4f} "
          f"(n={metrics['n_heldout']}), worst-group accuracy={metrics['worst_group_accuracy']:.4f}{noise}; "
          f"checkpoint {out_dir / CKPT_NAME}")
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="oracle_train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
