"""InvDiff groups app: ``python -m biasamp.invdiff_groups checkpoint=<ckpt> [groups=grouper|true_labels K=8 ...]``.

Composes conf/invdiff_groups.yaml and runs InvDiff's steps 1 and 2 (mitigation.invdiff) on the checkpoint's own
training set (rebuilt from its dataset config): the per-sample losses of the frozen (EMA) model, then either the
label-free grouper (``groups=grouper``) or the true (class, bias value) groups (``groups=true_labels``: the
upper-bound control). Writes ``${paths.output_dir}/invdiff/<name>/groups.pt`` (mitigation.groups) and
``diagnostics.json`` (how the groups separate bias-aligned from bias-conflicting images; never used to fit), and
prints the diagnostics in one line. Bad input: one line on stderr, exit status 2, no folder left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biasamp.apps import app_device, app_options, check_device, cpu_threads, run_app, set_cpu_threads
from biasamp.atomic import atomic_write_json
from biasamp.checkpoints import load_denoiser, load_finished
from biasamp.counting.plan import sha256_file
from biasamp.data import build_dataset
from biasamp.errors import UsageError
from biasamp.identity import check_folder_name
from biasamp.mitigation.groups import GROUPS_NAME, GroupsFile
from biasamp.mitigation.hspace import bias_labels
from biasamp.mitigation.invdiff import (
    diagnostics_line,
    fit_grouper,
    fixed_sigmas,
    grouper_diagnostics,
    loss_settings,
    sample_losses,
    true_groups,
)
from biasamp.speed import fast_denoiser, resolve_precision

GROUP_SOURCES = ("grouper", "true_labels")
KEYS = ("checkpoint", "allow_unfinished", "groups", "n_sigma", "K", "steps", "lr", "seed", "batch_size", "device",
        "precision", "threads", "name")
DIAGNOSTICS_NAME = "diagnostics.json"


def invdiff_name_part(groups: Any, k: Any, n_sigma: Any, seed: Any) -> str:
    """The settings in a groups folder's default name, e.g. ``grouper-K8-sigma8-seed0``, ``true_labels-sigma1random
    -seed0``; never raises (it runs while Hydra names the folder, before the settings are checked)."""
    sig = f"sigma{n_sigma}" + ("random" if str(n_sigma) == "1" else "")
    head = str(groups) if str(groups) == "true_labels" else f"{groups}-K{k}"
    return f"{head}-{sig}-seed{seed}"


OmegaConf.register_new_resolver("biasamp_invdiff_part", invdiff_name_part, replace=True)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(options: Mapping[str, Any]) -> None:
    """Every setting that needs no file; UsageError (one line) otherwise."""
    unknown = sorted(set(options) - set(KEYS) - {"paths"})
    if unknown:
        raise UsageError(f"{unknown[0]} is not a setting of the invdiff_groups app (allowed: {', '.join(KEYS)})")
    if options.get("checkpoint") in (None, "", "???"):
        raise UsageError("checkpoint is required: python -m biasamp.invdiff_groups checkpoint=<ckpt file or run "
                         "folder>")
    if options.get("groups") not in GROUP_SOURCES:
        raise UsageError(f"groups={options.get('groups')!r} is not allowed: use grouper (InvDiff's label-free "
                         "grouper) or true_labels (the true (class, bias value) groups: the upper-bound control)")
    for key, low, what in (("K", 2, "groups"), ("steps", 1, "full-batch Adam steps"),
                           ("n_sigma", 1, "noise levels per image; 1: one random sigma, as the released code"),
                           ("batch_size", 1, "images per forward"), ("seed", 0, "the noise streams and W's start")):
        if not _int(options.get(key)) or options[key] < low:
            raise UsageError(f"{key}={options.get(key)!r} is not allowed: an integer >= {low} ({what})")
    lr = options.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(float(lr)) or lr <= 0:
        raise UsageError(f"lr={lr!r} is not allowed: a finite number > 0 (the grouper's Adam learning rate)")
    if not isinstance(options.get("allow_unfinished"), bool):
        raise UsageError(f"allow_unfinished={options.get('allow_unfinished')!r} is not allowed: true or false")
    check_device(options.get("device"))
    resolve_precision("precision", options.get("precision"), "cpu")
    cpu_threads(options.get("threads"), "threads")
    check_folder_name("name", options.get("name"))


def _plain(value: Any) -> Any:
    """A config value as plain Python (dicts, lists, str, numbers, None): weights-only and JSON safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def make_groups(cfg: DictConfig, out_dir: Path) -> GroupsFile:
    """Check; per-sample losses of the frozen model on its training set; the groups; diagnostics; the files."""
    options = app_options(cfg)
    check_config(options)
    checkpoint, meta = load_finished(options["checkpoint"], options["allow_unfinished"])
    weight_fn, loss_cfg = loss_settings(meta["config"].get("loss"))
    dataset_cfg = _plain(meta["config"]["dataset"])
    dataset = build_dataset(dataset_cfg)
    # the first bias attribute
    attribute, value_names, values = bias_labels(dataset, None, need="the groups' diagnostics (and "
                                                 "groups=true_labels)")
    labels = dataset.labels.numpy().astype(np.int64)
    aligned = values == labels  # bias value k is aligned with class k
    device = app_device(options["device"])
    if device.type == "cpu":
        set_cpu_threads(options["threads"], "threads")
    precision = resolve_precision("precision", options["precision"], device)
    start = time.perf_counter()

    denoiser, _ = load_denoiser(checkpoint)
    net = fast_denoiser(denoiser, device, precision=precision, channels_last=False, compile=False)
    n_sigma = int(options["n_sigma"])
    sigmas = fixed_sigmas(loss_cfg["P_mean"], loss_cfg["P_std"], n_sigma) if n_sigma > 1 else None
    n = len(labels)
    indices = torch.arange(n, dtype=torch.int64)
    losses = sample_losses(net, dataset.images, torch.as_tensor(labels), sigmas, n_sigma if sigmas is None else None,
                           weight_fn, int(options["seed"]), int(options["batch_size"]), device, indices=indices,
                           P_mean=loss_cfg["P_mean"], P_std=loss_cfg["P_std"])
    loss_seconds = time.perf_counter() - start
    info: dict[str, Any] = {}
    if options["groups"] == "grouper":
        w = fit_grouper(losses, K=int(options["K"]), steps=int(options["steps"]), lr=float(options["lr"]),
                        seed=int(options["seed"]))
    else:
        w, pairs = true_groups(labels, values)
        info["true_groups"] = pairs  # group k = (class, bias value) pairs[k]
    diagnostics = grouper_diagnostics(w, aligned, labels, losses=losses)
    diagnostics.update(attribute=attribute, value_names=list(value_names), source=options["groups"], **info)
    settings = {**options, "checkpoint": str(checkpoint), "device": str(device), "precision": precision,
                "K": int(w.shape[1]), "loss": loss_cfg, "sigma_mode": "fixed" if sigmas is not None else "random"}
    # timings go to diagnostics.json only: groups.pt holds nothing that changes from one run to the next, so a
    # rerun writes the same file (the same sha256) and a fine-tune on it resumes instead of starting anew
    timing = {"loss_seconds": loss_seconds, "seconds": time.perf_counter() - start}
    groups = GroupsFile(W=w, indices=indices, labels=torch.as_tensor(labels), losses=losses,
                        sigmas=list(sigmas or []), sigma_mode=settings["sigma_mode"],
                        checkpoint_sha256=sha256_file(checkpoint), dataset={"config": dataset_cfg, "n": n},
                        source=options["groups"], settings=_plain(settings), diagnostics=_plain(diagnostics))
    out_dir.mkdir(parents=True, exist_ok=True)
    groups.save(out_dir / GROUPS_NAME)
    atomic_write_json(out_dir / DIAGNOSTICS_NAME, {**groups.diagnostics, **timing})
    groups.timing = timing  # for the app's summary line
    return groups


def run(cfg: DictConfig) -> GroupsFile:
    """Make the groups (bad input: one line, exit 2, no folder left); print the diagnostics line."""
    out_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    groups = run_app("invdiff_groups", lambda: make_groups(cfg, out_dir), out_dir)
    s = groups.timing
    mode = f"{len(groups.sigmas)} fixed sigmas" if groups.sigma_mode == "fixed" else "one random sigma"
    print(f"biasamp.invdiff_groups: {groups.source}, K={groups.K} groups of {groups.n} images (losses at {mode}, "
          f"{s['loss_seconds']:.0f} s; {s['seconds']:.0f} s in all): {diagnostics_line(groups.diagnostics)}; "
          f"{out_dir / GROUPS_NAME}")
    return groups


@hydra.main(version_base="1.3", config_path="conf", config_name="invdiff_groups")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
