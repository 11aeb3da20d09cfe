"""Count app: ``python -m biasamp.count checkpoint=<ckpt> [sampler=...] [guidance=...] [-m ...]``.

Samples the checkpoint's EMA denoiser under one sampling setting, classifies every sample's bias with an
oracle and writes exact counts into ``<paths.output_dir>/count/<sweep_name>/<job>/`` and the sweep's
results.csv (conf/count.yaml describes every option; biasamp.counting.runner the steps). Everything is checked
before any folder is made or the model loads: a bad value stops the app with one line on stderr and exit
status 2. A job continues where it stopped when rerun; a finished job rerun does no sampling.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biasamp.apps import run_app
from biasamp.counting.runner import count_job  # (importing biasamp.counting registers the folder-name resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="count")
def main(cfg: DictConfig) -> None:
    sweep_dir = Path(HydraConfig.get().runtime.output_dir)
    run_app("count", lambda: count_job(cfg, sweep_dir), sweep_dir)


if __name__ == "__main__":
    main()
