"""Build the EDM denoiser from a model config (the plain dict of a conf/model/*.yaml file).

Config shape:
    name: ddpmpp_32            # optional, the file stem
    sigma_data: 0.5            # optional (EDM defaults 0.5, 0.002, 80)
    sigma_min: 0.002
    sigma_max: 80.0
    net: {...}                 # keyword arguments of DDPMpp besides img_resolution/channels/label_dim
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from biasamp.models.ddpmpp import DDPMpp
from biasamp.models.precond import EDMPrecond

TOP_KEYS = ("name", "sigma_data", "sigma_min", "sigma_max", "net")
_DATA_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim")
NET_KEYS = tuple(p for p in inspect.signature(DDPMpp.__init__).parameters if p not in ("self", *_DATA_ARGS))


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _int_list(key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list of positive integers, got {value!r}")
    items = tuple(_positive_int(f"{key}[{i}]", v) for i, v in enumerate(value))
    if not items and not allow_empty:
        raise ValueError(f"{key} must not be empty")
    return items


def _probability(key: str, value: Any, upper_inclusive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and 0 <= value and (value <= 1 if upper_inclusive else value < 1)
    if not ok:
        bracket = "]" if upper_inclusive else ")"
        raise ValueError(f"{key} must be a probability in [0, 1{bracket}, got {value!r}")
    return float(value)


def _check_net(net_cfg: Mapping, img_resolution: int) -> dict[str, Any]:
    """Validate model.net and return DDPMpp keyword arguments with lists turned into tuples."""
    unknown = [k for k in net_cfg if k not in NET_KEYS]
    if unknown:
        raise ValueError(f"unknown key model.net.{unknown[0]}; allowed keys: {', '.join(NET_KEYS)}")
    kwargs = dict(net_cfg)
    for key in ("model_channels", "channel_mult_emb", "num_blocks", "channel_mult_noise"):
        if key in kwargs:
            kwargs[key] = _positive_int(f"model.net.{key}", kwargs[key])
    if "channel_mult" in kwargs:
        kwargs["channel_mult"] = _int_list("model.net.channel_mult", kwargs["channel_mult"],
                                           allow_empty=False)
    if "attn_resolutions" in kwargs:
        kwargs["attn_resolutions"] = _int_list("model.net.attn_resolutions", kwargs["attn_resolutions"],
                                               allow_empty=True)
    if "resample_filter" in kwargs:
        kwargs["resample_filter"] = _int_list("model.net.resample_filter", kwargs["resample_filter"],
                                              allow_empty=False)
    if "dropout" in kwargs:
        kwargs["dropout"] = _probability("model.net.dropout", kwargs["dropout"], upper_inclusive=False)
    if "label_dropout" in kwargs:
        kwargs["label_dropout"] = _probability("model.net.label_dropout", kwargs["label_dropout"],
                                               upper_inclusive=True)

    # Every level halves the resolution, and every attention resolution must actually occur.
    defaults = inspect.signature(DDPMpp.__init__).parameters
    channel_mult = kwargs.get("channel_mult", defaults["channel_mult"].default)
    attn_resolutions = kwargs.get("attn_resolutions", defaults["attn_resolutions"].default)
    levels = len(channel_mult)
    if img_resolution % 2 ** (levels - 1):
        raise ValueError(f"img_resolution {img_resolution} must be divisible by 2^(levels - 1) = "
                         f"{2 ** (levels - 1)} for model.net.channel_mult of {levels} levels")
    resolutions = [img_resolution >> level for level in range(levels)]
    for res in attn_resolutions:
        if res not in resolutions:
            raise ValueError(f"model.net.attn_resolutions contains {res}, which is not one of the network's "
                             f"resolutions {resolutions} at img_resolution {img_resolution}")
    return kwargs


def build_denoiser(model_cfg: Mapping, img_resolution: int, in_channels: int, label_dim: int) -> EDMPrecond:
    """EDMPrecond around DDPMpp(img_resolution, in_channels -> in_channels, label_dim, **model_cfg["net"]).

    Raises ValueError naming the offending key for unknown keys or out-of-range values.
    """
    unknown = [k for k in model_cfg if k not in TOP_KEYS]
    if unknown:
        raise ValueError(f"unknown key model.{unknown[0]}; allowed keys: {', '.join(TOP_KEYS)}")
    if "net" not in model_cfg or not isinstance(model_cfg["net"], Mapping):
        raise ValueError("model.net must be a mapping of DDPMpp keyword arguments")
    img_resolution = _positive_int("img_resolution", img_resolution)
    in_channels = _positive_int("in_channels", in_channels)
    if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
        raise ValueError(f"label_dim must be a non-negative integer, got {label_dim!r}")

    sigmas = {k: model_cfg.get(k, default) for k, default in
              (("sigma_data", 0.5), ("sigma_min", 0.002), ("sigma_max", 80.0))}
    for key, value in sigmas.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"model.{key} must be a positive number, got {value!r}")
    if not sigmas["sigma_min"] < sigmas["sigma_max"]:
        raise ValueError(f"model.sigma_min ({sigmas['sigma_min']}) must be below model.sigma_max "
                         f"({sigmas['sigma_max']})")

    net_kwargs = _check_net(model_cfg["net"], img_resolution)
    net = DDPMpp(img_resolution, in_channels, in_channels, label_dim=label_dim, **net_kwargs)
    return EDMPrecond(net, label_dim, **{k: float(v) for k, v in sigmas.items()})
