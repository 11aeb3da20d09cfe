"""Build a dataset from its config (a ``conf/dataset/*.yaml`` group entry), dispatching on ``name``.

Every other key of the config is passed on as a keyword argument, so a key no builder knows is an
error naming it rather than being silently ignored. :func:`check_dataset_config` checks what can be checked
without reading any data (the name, the keys, the rho values), so an app can refuse a bad config before any
work; :func:`build_dataset` runs it first, and the builders then check the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch.utils.data import Dataset

from biasamp.data.bffhq import BFFHQ
from biasamp.data.biased_mnist import BiasedMNIST, check_classes
from biasamp.data.multicolor_mnist import MultiColorMNIST
from biasamp.data.rho import NULL_DATASETS, check_rho
from biasamp.data.waterbirds import Waterbirds
from biasamp.errors import UsageError

BUILDERS: dict[str, Callable[..., Dataset]] = {
    "biased_mnist": BiasedMNIST,
    "multicolor_mnist": MultiColorMNIST,
    "waterbirds": Waterbirds,
    "bffhq": BFFHQ,
}
RHO_KEYS: dict[str, tuple[str, ...]] = {
    "biased_mnist": ("rho",),
    "multicolor_mnist": ("rho_left", "rho_right"),
    "waterbirds": ("rho",),
    "bffhq": ("rho",),
}
"""The rho keys of each builder. rho=null is allowed for NULL_DATASETS only; the MNIST builders (which take
``classes_to_use``) also take one rho per used class."""


def _plain(cfg: Mapping) -> dict[str, Any]:
    """A resolved plain dict, whether given a dict or an OmegaConf DictConfig."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but the data package needs none
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def check_dataset_config(cfg: Mapping) -> None:
    """Check a dataset config without reading any data: a known ``name``, no unknown key, no missing one, and
    valid rho values (:func:`~biasamp.data.rho.check_rho`). Raises UsageError naming the key."""
    cfg = _plain(cfg)
    name = cfg.pop("name", None)
    if name not in BUILDERS:
        raise UsageError(f"dataset={name!r} is not a known dataset; available: {', '.join(BUILDERS)}")
    params = inspect.signature(BUILDERS[name]).parameters
    unknown = sorted(set(cfg) - set(params))
    if unknown:
        allowed = ", ".join(p for p in params if p != "name")
        raise UsageError(f"unknown key(s) {', '.join(f'dataset.{k}' for k in unknown)} for dataset={name!r}; "
                         f"allowed: {allowed}")
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty and p.name not in cfg]
    if missing:
        raise UsageError(f"missing key(s) {', '.join(f'dataset.{k}' for k in missing)} for dataset={name!r}; "
                         f"add them to conf/dataset/{name}.yaml or give them on the command line")
    num_classes = None
    if "classes_to_use" in params:  # the MNIST builders: one rho per used class is allowed
        num_classes = len(check_classes(cfg.get("classes_to_use")))
    for key in RHO_KEYS[name]:
        check_rho(cfg[key], f"dataset.{key}", allow_null=name in NULL_DATASETS, num_classes=num_classes)


def config_classes_and_attributes(cfg: Mapping) -> tuple[int, list[str]]:
    """(number of classes K, bias attribute names) of the dataset a checked config builds, reading no data."""
    cfg = _plain(cfg)
    builder = BUILDERS[cfg["name"]]
    if "classes_to_use" in inspect.signature(builder).parameters:
        num_classes = len(check_classes(cfg.get("classes_to_use")))
    else:
        num_classes = len(builder.class_names)
    return num_classes, list(builder.bias_attributes)


def build_dataset(cfg: Mapping) -> Dataset:
    """Build the dataset that ``cfg["name"]`` names, passing the other keys as keyword arguments (checked
    first with :func:`check_dataset_config`)."""
    check_dataset_config(cfg)
    cfg = _plain(cfg)
    name = cfg.pop("name")
    return BUILDERS[name](**cfg)
