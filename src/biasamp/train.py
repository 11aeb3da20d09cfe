"""Training app: ``python -m biasamp.train [dataset=...] [model=...] [rho=...] [experiment=...]``.

Composes conf/train.yaml and calls :func:`biasamp.training.fit.train`. Bad input: one line on stderr, exit 2,
no folder left. A run stopped before its target (SIGTERM/SIGINT: 128 + the signal; trainer.max_time: 75) prints
one line and exits non-zero; ``resume=auto`` continues it. A NaN/Inf loss that persists: exit 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biasamp.apps import run_app
from biasamp.launch import ddp_job
from biasamp.training import NonFiniteLossError
from biasamp.training.fit import TrainingStopped, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        with ddp_job():
            run_app("train", lambda: train(cfg, run_dir), run_dir)
    except TrainingStopped as err:
        print(f"biasamp.train: {err}", file=sys.stderr)
        sys.exit(err.status)
    except NonFiniteLossError as err:
        print(f"biasamp.train: error: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
