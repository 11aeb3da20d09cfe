"""Build a dataset from its config (a ``conf/dataset/*.yaml`` group entry), dispatching on ``name``.

Every other key of the config is passed on as a keyword argument, so a key no builder knows is an
error naming it rather than being silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from biasamp.data.biased_mnist import BiasedMNIST


def _not_yet(name: str, required: str, how_to_get: str) -> Callable[..., Dataset]:
    """A placeholder builder for a real-data loader that lands in a later issue.

    It checks the data first (so a user learns what to download now) and then refuses honestly.
    """

    def build(
        data_dir: str | Path, rho: float, split: str = "pooled", img_resolution: int = 64, seed: int = 0
    ) -> Dataset:
        path = Path(data_dir) / required
        if not path.exists():
            raise FileNotFoundError(
                f"{name} data not found: expected {path} (dataset.data_dir={data_dir}). {how_to_get}"
            )
        raise NotImplementedError(
            f"The {name} loader is not implemented yet (it lands in a later issue); found its data at {path}."
        )

    build.__name__ = f"build_{name}"
    return build


BUILDERS: dict[str, Callable[..., Dataset]] = {
    "biased_mnist": BiasedMNIST,
    "waterbirds": _not_yet(
        "waterbirds",
        "waterbird_complete95_forest2water2/metadata.csv",
        "Download and unpack the Waterbirds dataset (waterbird_complete95_forest2water2.tar.gz, from the "
        "group-DRO release by Sagawa et al.) into dataset.data_dir.",
    ),
    "bffhq": _not_yet(
        "bffhq",
        "bffhq/0.5pct/",
        "Download BFFHQ (the bffhq folder with 0.5pct/, valid/ and test/ from the Learning Debiased "
        "Representation with Disentangled Feature Augmentation release) into dataset.data_dir.",
    ),
}


def _plain(cfg: Mapping) -> dict[str, Any]:
    """A resolved plain dict, whether given a dict or an OmegaConf DictConfig."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but the data package needs none
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_dataset(cfg: Mapping) -> Dataset:
    """Build the dataset that ``cfg["name"]`` names, passing the other keys as keyword arguments."""
    cfg = _plain(cfg)
    name = cfg.pop("name", None)
    if name not in BUILDERS:
        raise ValueError(f"dataset={name!r} is not a known dataset; available: {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    params = inspect.signature(builder).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p != "name")
        raise ValueError(
            f"unknown key(s) {', '.join(f'dataset.{k}' for k in unknown)} for dataset={name!r}; "
            f"allowed: {allowed}"
        )
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in cfg]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(f'dataset.{k}' for k in missing)} for dataset={name!r}")
    return builder(**cfg)
