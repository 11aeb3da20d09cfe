"""A count job's h-space steering, resolved against its heads file before any sampling (``steer=`` in the count
app; the algorithm is in sampling.steering, the heads file in mitigation.heads).

:func:`resolve_steering` refuses, with one line each: heads trained on another checkpoint (sha256), another class
list or bias attribute than the oracle counts, a sigma grid without a head for a sigma this job evaluates inside
the window, a target that is not a distribution over the bias values (or has a zero where chi2 and KL divide),
a sample target that is not a value name, trajectory heads (which carry the model's prior at one guidance w)
for a job at another w. It returns the steering as it enters the job's identity: every setting
that changes the samples, the heads by their sha256, the per-class targets resolved to numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from biasamp.errors import UsageError
from biasamp.mitigation.heads import HeadsFile
from biasamp.sampling import evaluated_sigmas
from biasamp.sampling.steering import SIGMA_RTOL

TARGET_SUM_TOL = 1e-6


def _distribution(key: str, values: Any, value_names: Sequence[str]) -> list[float]:
    """A list of V shares > 0 summing to 1 (UsageError otherwise)."""
    v = len(value_names)
    ok = isinstance(values, list) and len(values) == v and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in values)
    if not ok:
        raise UsageError(f"{key}={values!r} is not allowed: give {v} shares, one per value {list(value_names)}")
    if min(values) <= 0:
        raise UsageError(f"{key}={values!r} is not allowed: every share must be > 0 (chi2 and KL divide by the "
                         "target; a share of 0 cannot be steered to)")
    if abs(math.fsum(values) - 1.0) > TARGET_SUM_TOL:
        raise UsageError(f"{key}={values!r} is not allowed: the shares must sum to 1 (they sum to "
                         f"{math.fsum(values):.6g})")
    return [float(x) for x in values]


def resolve_targets(target: Any, heads: HeadsFile) -> tuple[str, list[list[float]]]:
    """(the target's label, one distribution over the heads' values per class) of ``steer.target``."""
    k, v = len(heads.class_names), len(heads.value_names)
    if target == "uniform":
        return "uniform", [[1.0 / v] * v for _ in range(k)]
    if target == "data":
        for c, row in enumerate(heads.data_distribution):
            zero = [heads.value_names[j] for j, x in enumerate(row) if x <= 0]
            if zero:
                raise UsageError(f"steer.target=data is not allowed for these heads: class {heads.class_names[c]} has "
                                 f"no training image with value(s) {zero}, a zero where chi2 and KL divide; use "
                                 "steer.target=uniform or a list of shares > 0")
        return "data", [[float(x) for x in row] for row in heads.data_distribution]
    if isinstance(target, list) and target and all(isinstance(t, list) for t in target):
        if len(target) != k:
            raise UsageError(f"steer.target={target!r} is not allowed: one list per class gives {k} lists (classes "
                             f"{heads.class_names})")
        return "custom", [_distribution(f"steer.target[{c}]", t, heads.value_names) for c, t in enumerate(target)]
    return "custom", [_distribution("steer.target", target, heads.value_names)] * k


def resolve_steering(steer: Mapping[str, Any] | None, meta: Mapping[str, Any], checkpoint_sha256: str,
                     sampler: Mapping[str, Any], attributes: Sequence[str], value_names: Sequence[Sequence[str]],
                     guidance: float = 0.0, guidance_uncond: str = "null"
                     ) -> tuple[dict[str, Any] | None, HeadsFile | None]:
    """(the steering's identity entry, the heads) for checked ``steer`` settings; (None, None) without steering."""
    if steer is None:
        return None, None
    path = Path(steer["heads"])
    heads = HeadsFile.load(path)
    redo = "train heads for it: python -m biasamp.hspace checkpoint=<this checkpoint> sampler=<this sampler>"
    if heads.checkpoint_sha256 != checkpoint_sha256:
        raise UsageError(f"steer.heads={path} was trained on checkpoint sha256 {heads.checkpoint_sha256[:12]}..., not "
                         f"on this one ({checkpoint_sha256[:12]}...); {redo}")
    class_names = [str(c) for c in meta["class_names"]]
    if [str(c) for c in heads.class_names] != class_names:
        raise UsageError(f"steer.heads={path} has classes {heads.class_names}, the checkpoint {class_names}; {redo}")
    if heads.attribute not in attributes:
        raise UsageError(f"steer.heads={path} predicts attribute {heads.attribute!r}, which the oracle does not count "
                         f"({list(attributes)}); use an oracle of that attribute or heads of attribute={attributes[0]}")
    oracle_values = [str(x) for x in value_names[list(attributes).index(heads.attribute)]]
    if [str(x) for x in heads.value_names] != oracle_values:
        raise UsageError(f"steer.heads={path} has values {heads.value_names} of {heads.attribute}, the oracle "
                         f"{oracle_values}; use an oracle and heads with the same values")
    traj = heads.settings.get("trajectory") if heads.settings.get("h_source") == "trajectory" else None
    if traj is not None and (float(traj["guidance"]) != float(guidance) or guidance > 0
                             and traj["guidance_uncond"] != guidance_uncond):
        raise UsageError(f"steer.heads={path} were trained on the model's samples at guidance "
                         f"{float(traj['guidance']):g} (guidance_uncond {traj['guidance_uncond']}), and carry that "
                         f"prior; this job samples at guidance {float(guidance):g} (guidance_uncond "
                         f"{guidance_uncond}): train heads with h_source=trajectory trajectory.guidance=<this w>, or "
                         "use inversion/noised heads")
    window = steer.get("sigma_window")
    lo, hi = (float(window[0]), float(window[1])) if window else (0.0, math.inf)
    needed = [s for s in evaluated_sigmas(sampler, sampler["sigma_min"], sampler["sigma_max"]) if lo <= s <= hi]
    grid = [float(s) for s in heads.sigmas]
    missing = [s for s in needed if not any(abs(g - s) <= SIGMA_RTOL * s for g in grid)]
    if missing:
        trained = heads.settings.get("sampler", {})
        raise UsageError(f"steer.heads={path} has no head for sigma={missing[0]:.6g} ({len(missing)} of the "
                         f"{len(needed)} sigmas this sampler evaluates inside the window): its heads are for sampler "
                         f"{trained.get('name')} with {trained.get('num_steps')} steps; {redo}, or narrow "
                         "steer.sigma_window")
    entry: dict[str, Any] = {
        "mode": steer["mode"], "heads_sha256": _sha256(path), "h_source": heads.settings.get("h_source"),
        "attribute": heads.attribute,
        "scale": float(steer["scale"]), "temperature": float(steer["temperature"]),
        "sigma_window": [lo, hi] if window else None, "branches": steer["branches"],
    }
    if steer["mode"] == "distribution":
        label, targets = resolve_targets(steer["target"], heads)
        entry.update(target=label, targets=targets, batch=int(steer["batch"]), loss=steer["loss"])
    else:
        name = str(steer["target"])
        if name not in [str(x) for x in heads.value_names]:
            raise UsageError(f"steer.target={steer['target']!r} is not allowed: name one value of "
                             f"{heads.attribute}: {heads.value_names}")
        entry.update(target=name, target_value=[str(x) for x in heads.value_names].index(name))
    return entry, heads


def _sha256(path: Path) -> str:
    from biasamp.counting.plan import sha256_file

    return sha256_file(path)


def steer_folder_part(steering: Mapping[str, Any] | None) -> str | None:
    """The readable part of a steered job's folder name: ``steer-<target>-s<scale>[-B<batch>]``."""
    if steering is None:
        return None
    kind = "steer" if steering["mode"] == "distribution" else "steersample"
    part = f"{kind}-{steering['target']}-s{steering['scale']:g}"
    return f"{part}-B{steering['batch']}" if steering["mode"] == "distribution" else part
