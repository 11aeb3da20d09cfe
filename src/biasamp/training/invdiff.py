"""InvDiff's fine-tuning (Hou et al., KDD 2025) in the training app: ``python -m biasamp.train experiment=invdiff
invdiff.base=<ckpt> invdiff.groups=<groups.pt>``.

The base checkpoint's network is frozen and a side network Delta trains (models.mixed: F_mix = r F_Delta +
(1 - r) F_frozen, or F_frozen + r F_Delta with ``invdiff.mix=residual``). Per micro-batch, with l_i the EDM loss of
image i (the run's ``loss`` config) and g_ik its soft group weights from the groups file (the grouper's W, or the
true (class, bias) groups of ``invdiff_groups groups=true_labels``):

    L_k = sum_i g_ik l_i / (sum_i g_ik + 1e-9),   loss = mean_k L_k + lam Var_k L_k   (groups without weight dropped)

(group V-REx; mitigation.invdiff.vrex_loss). The run trains on the base's own training set: its dataset and model
settings are the base checkpoint's, whatever the run's config says, and they are what the run's checkpoints
record, so the count, report and oracle apps read the mixed model like any other. The run's identity holds the
base's and the groups file's sha256 (their paths are not part of it), r, mix, lam and delta_channels; EMA,
checkpoints, resumption and the lr schedule are the training app's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from biasamp.errors import UsageError

INVDIFF_KEYS = ("base", "groups", "r", "mix", "lam", "delta_channels")
RESOLVED_KEYS = ("base_sha256", "groups_sha256", "groups_source")  # added by resolve_invdiff
HINT = ("python -m biasamp.train experiment=invdiff invdiff.base=<base ckpt> invdiff.groups=<groups.pt of python -m "
        "biasamp.invdiff_groups checkpoint=<base ckpt>>")


def check_invdiff_config(entry: Mapping[str, Any] | None) -> None:
    """The ``invdiff`` settings that need no file (UsageError, one line)."""
    if entry is None:
        return
    from biasamp.models.mixed import check_mix

    unknown = sorted(set(entry) - set(INVDIFF_KEYS) - set(RESOLVED_KEYS))
    if unknown:
        raise UsageError(f"invdiff.{unknown[0]} is not a setting (allowed: {', '.join(INVDIFF_KEYS)})")
    for key in ("base", "groups"):
        if entry.get(key) in (None, "", "???"):
            raise UsageError(f"invdiff.{key} is required: {HINT}")
    check_mix(entry.get("r"), entry.get("mix"))
    lam = entry.get("lam")
    if not isinstance(lam, int | float) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise UsageError(f"invdiff.lam={lam!r} is not allowed: a finite number >= 0 (the weight of Var_k L_k; "
                         "the released code's 1)")
    width = entry.get("delta_channels")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise UsageError(f"invdiff.delta_channels={width!r} is not allowed: null (Delta = a copy of the base) or a "
                         "positive integer (a fresh, narrower DDPM++ of that base width)")


def resolve_invdiff(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` of an InvDiff run with the base checkpoint's ``dataset`` and ``model``, and in ``invdiff`` the two
    files' sha256 and the groups' source (``grouper`` or ``true_labels``: what the count and report apps call the
    model); other settings unchanged. UsageError for a file that cannot be read."""
    entry = settings.get("invdiff")
    if not entry:
        return dict(settings)
    from biasamp.checkpoints import load_checkpoint, metadata, resolve_checkpoint
    from biasamp.counting.plan import sha256_file
    from biasamp.mitigation.groups import GroupsFile

    base = resolve_checkpoint(entry["base"]).resolve()
    meta = metadata(load_checkpoint(base))
    groups = Path(entry["groups"]).expanduser().resolve()
    if not groups.is_file():
        raise UsageError(f"invdiff.groups={entry['groups']}: no such file; {HINT}")
    out = dict(settings)
    out["dataset"] = dict(meta["config"]["dataset"])
    out["model"] = dict(meta["config"]["model"])
    out["invdiff"] = {**entry, "base": str(base), "groups": str(groups), "base_sha256": sha256_file(base),
                      "groups_sha256": sha256_file(groups), "groups_source": GroupsFile.load(groups).source}
    return out


def group_weights(entry: Mapping[str, Any], dataset: Any) -> tuple[Tensor, dict[str, Any]]:
    """(per-image group weights (N, K) float32 of the rebuilt training set, the base's EMA state dict) after the
    checks: the groups were made for this base checkpoint and this training set. Images the groups file does not
    list get weight 0 (they enter no group)."""
    from biasamp.checkpoints import ema_state_dict, load_checkpoint
    from biasamp.mitigation.groups import GroupsFile

    base = load_checkpoint(entry["base"])
    groups = GroupsFile.load(entry["groups"])
    groups.check_source(entry["base_sha256"], dict(base["hyper_parameters"]["config"]["dataset"]),
                        len(dataset.labels), entry["groups"])
    weights = torch.zeros(len(dataset.labels), groups.K, dtype=torch.float32)
    weights[torch.as_tensor(groups.indices, dtype=torch.long)] = torch.as_tensor(groups.W, dtype=torch.float32)
    return weights, ema_state_dict(base)
