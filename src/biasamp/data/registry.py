"""Build a dataset from its config (a ``conf/dataset/*.yaml`` group entry), dispatching on ``name``.

Every other key of the config is passed on as a keyword argument, so a key no builder knows is an
error naming it rather than being silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from biasamp.data.bffhq import BFFHQ
from biasamp.data.biased_mnist import BiasedMNIST
from biasamp.data.multicolor_mnist import MultiColorMNIST
from biasamp.data.waterbirds import Waterbirds

BUILDERS: dict[str, Callable[..., Dataset]] = {
    "biased_mnist": BiasedMNIST,
    "multicolor_mnist": MultiColorMNIST,
    "waterbirds": Waterbirds,
    "bffhq": BFFHQ,
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
