"""h-space head app: ``python -m biasamp.hspace checkpoint=<ckpt> [sampler=... h_source=inversion|noised]``.

Composes conf/hspace.yaml and calls :func:`biasamp.mitigation.hspace.train_heads`, which fits one linear head per
noise level of the sampler setting on h of the checkpoint's training images and writes ``heads.pt``,
``accuracy.csv`` and ``accuracy.png``. Bad input: one line on stderr, exit status 2, no folder left.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biasamp.apps import run_app
from biasamp.mitigation.heads import HEADS_NAME, HeadsFile
from biasamp.mitigation.hspace import accuracy_table, train_heads


def run(cfg: DictConfig) -> HeadsFile:
    """Train the heads (bad input: one line, exit 2, no folder left); print the accuracy table."""
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    heads = run_app("hspace", lambda: train_heads(cfg, out_dir), out_dir)
    print(accuracy_table(heads))
    print(f"biasamp.hspace: {len(heads.sigmas)} heads ({heads.attribute}: {', '.join(heads.value_names)}; "
          f"{heads.n_train} training and {heads.n_heldout} held-out images, h {heads.settings['h_source']}) in "
          f"{heads.settings['seconds']:.0f} s; {out_dir / HEADS_NAME}")
    return heads


@hydra.main(version_base="1.3", config_path="conf", config_name="hspace")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
