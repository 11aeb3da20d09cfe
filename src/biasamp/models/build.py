"""Build the EDM denoiser from a model config (the plain dict of a conf/model/*.yaml file).

Config shape:
    name: ddpmpp_32            # optional, the file stem
    img_resolution: 32         # optional, the image side the preset is meant for (informational here: the
                               # network is built at the dataset's resolution; apps compare the two)
    sigma_data: 0.5            # optional (EDM defaults 0.5, 0.002, 80)
    sigma_min: 0.002
    sigma_max: 80.0
    net: {...}                 # keyword arguments of DDPMpp besides img_resolution/channels/label_dim

:func:`check_model_config` checks a config at a given resolution without building anything (UsageError naming
``model.<key>``); :func:`build_denoiser` runs it, then builds.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from biasamp.errors import UsageError
from biasamp.models.ddpmpp import DDPMpp, block_channels, group_norm_fits
from biasamp.models.precond import EDMPrecond

TOP_KEYS = ("name", "img_resolution", "sigma_data", "sigma_min", "sigma_max", "net")
_DATA_ARGS = ("img_resolution", "in_channels", "out_channels", "label_dim")
NET_KEYS = tuple(p for p in inspect.signature(DDPMpp.__init__).parameters if p not in ("self", *_DATA_ARGS))


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{key}={value!r} is not allowed: a positive integer")
    return value


def _int_list(key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise UsageError(f"{key}={value!r} is not allowed: a list of positive integers")
    items = tuple(_positive_int(f"{key}[{i}]", v) for i, v in enumerate(value))
    if not items and not allow_empty:
        raise UsageError(f"{key}=[] is not allowed: a non-empty list of positive integers")
    return items


def _probability(key: str, value: Any, upper_inclusive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and 0 <= value and (value <= 1 if upper_inclusive else value < 1)
    if not ok:
        bracket = "]" if upper_inclusive else ")"
        raise UsageError(f"{key}={value!r} is not allowed: a probability in [0, 1{bracket}")
    return float(value)


def _check_net(net_cfg: Mapping, img_resolution: int) -> dict[str, Any]:
    """Validate model.net and return DDPMpp keyword arguments with lists turned into tuples."""
    unknown = [k for k in net_cfg if k not in NET_KEYS]
    if unknown:
        raise UsageError(f"model.net.{unknown[0]} is not a key of the network; allowed keys: {', '.join(NET_KEYS)}")
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
        raise UsageError(f"img_resolution={img_resolution} does not fit model.net.channel_mult of {levels} levels: "
                         f"the resolution must be divisible by 2^(levels - 1) = {2 ** (levels - 1)}")
    resolutions = [img_resolution >> level for level in range(levels)]
    for res in attn_resolutions:
        if res not in resolutions:
            raise UsageError(f"model.net.attn_resolutions contains {res}, which is not one of the network's "
                             f"resolutions {resolutions} at img_resolution {img_resolution}")

    # What DDPMpp would refuse while being built: the noise embedding's width and every block's GroupNorm.
    model_channels = kwargs.get("model_channels", defaults["model_channels"].default)
    noise_channels = model_channels * kwargs.get("channel_mult_noise", defaults["channel_mult_noise"].default)
    if noise_channels < 4 or noise_channels % 2:
        raise UsageError(f"model.net.model_channels={model_channels} is not allowed with channel_mult_noise: their "
                         f"product ({noise_channels}) must be even and >= 4 for the noise embedding")
    num_blocks = kwargs.get("num_blocks", defaults["num_blocks"].default)
    for pair in block_channels(model_channels, channel_mult, num_blocks):
        bad = [c for c in pair if not group_norm_fits(c)]
        if bad:
            raise UsageError(f"model.net.model_channels={model_channels} with channel_mult={list(channel_mult)} "
                             f"gives a block of {bad[0]} channels, which GroupNorm cannot split into "
                             "min(32, channels // 4) equal groups; pick model_channels so that every block has a "
                             "multiple of 4 channels up to 128 and of 32 above (e.g. 32, 64 or 128)")
    return kwargs


def check_model_config(model_cfg: Mapping, img_resolution: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Check a model config (a conf/model/*.yaml) for a network at ``img_resolution`` px, building nothing.

    Returns ``(sigmas, net_kwargs)``: the EDM sigma_data/sigma_min/sigma_max (defaults filled in) and the DDPMpp
    keyword arguments (lists as tuples). Raises UsageError naming the offending key for unknown keys or
    out-of-range values, and for a resolution the levels or attention resolutions do not fit. Whether the
    dataset's resolution equals ``model.img_resolution`` (the preset's) is for the caller to decide.
    """
    if not isinstance(model_cfg, Mapping):
        raise UsageError(f"model={model_cfg!r} is not allowed: a mapping (a conf/model/*.yaml file)")
    unknown = [k for k in model_cfg if k not in TOP_KEYS]
    if unknown:
        raise UsageError(f"model.{unknown[0]} is not a model key; allowed keys: {', '.join(TOP_KEYS)}")
    if "net" not in model_cfg or not isinstance(model_cfg["net"], Mapping):
        raise UsageError(f"model.net={model_cfg.get('net')!r} is not allowed: a mapping of DDPMpp keyword arguments")
    if model_cfg.get("img_resolution") is not None:
        _positive_int("model.img_resolution", model_cfg["img_resolution"])
    img_resolution = _positive_int("img_resolution", img_resolution)

    sigmas = {k: model_cfg.get(k, default) for k, default in
              (("sigma_data", 0.5), ("sigma_min", 0.002), ("sigma_max", 80.0))}
    for key, value in sigmas.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise UsageError(f"model.{key}={value!r} is not allowed: a finite number > 0")
    if not sigmas["sigma_min"] < sigmas["sigma_max"]:
        raise UsageError(f"model.sigma_min={sigmas['sigma_min']} is not allowed: it must be below model.sigma_max "
                         f"({sigmas['sigma_max']})")
    return {k: float(v) for k, v in sigmas.items()}, _check_net(model_cfg["net"], img_resolution)


def build_denoiser(model_cfg: Mapping, img_resolution: int, in_channels: int, label_dim: int) -> EDMPrecond:
    """EDMPrecond around DDPMpp(img_resolution, in_channels -> in_channels, label_dim, **model_cfg["net"]).

    ``img_resolution`` is the dataset's. The config is checked first (:func:`check_model_config`, UsageError);
    ``in_channels`` and ``label_dim`` come from the dataset, not the user (ValueError when they are not counts).
    """
    sigmas, net_kwargs = check_model_config(model_cfg, img_resolution)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
        raise ValueError(f"label_dim must be a non-negative integer, got {label_dim!r}")
    net = DDPMpp(img_resolution, in_channels, in_channels, label_dim=label_dim, **net_kwargs)
    return EDMPrecond(net, label_dim, **sigmas)


def build_mixed_denoiser(model_cfg: Mapping, img_resolution: int, in_channels: int, label_dim: int, r: float,
                         mix: str = "convex", delta_channels: int | None = None,
                         base_state: Mapping[str, Any] | None = None) -> EDMPrecond:
    """InvDiff's mixed model (models.mixed): EDMPrecond around MixedNet(frozen base DDPM++, Delta), the base built
    from ``model_cfg`` as :func:`build_denoiser` does. ``base_state``: the base denoiser's state dict (keys of
    ``EDMPrecond.state_dict()``, e.g. a checkpoint's EMA weights), loaded into the frozen network before Delta is
    copied from it; without it both start as built (a checkpoint of the mixed model then loads over them)."""
    from biasamp.models.mixed import MixedNet, make_delta

    base = build_denoiser(model_cfg, img_resolution, in_channels, label_dim)
    if base_state is not None:
        base.load_state_dict(dict(base_state), strict=True)
    _, net_kwargs = check_model_config(model_cfg, img_resolution)
    if delta_channels is not None:
        _check_net({**net_kwargs, "model_channels": _positive_int("invdiff.delta_channels", delta_channels)},
                   img_resolution)
    net = base.net
    delta = make_delta(net, net_kwargs, delta_channels)
    mixed = MixedNet(net, delta, r, mix)
    return EDMPrecond(mixed, label_dim, sigma_data=base.sigma_data, sigma_min=base.sigma_min,
                      sigma_max=base.sigma_max)
