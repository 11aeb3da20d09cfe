"""Oracles: predict the bias attribute(s) of generated images (colour oracle; trained classifiers later)."""

from collections.abc import Mapping
from typing import Any

from biasamp.oracles.base import Oracle, OracleOutput
from biasamp.oracles.colour import ColourOracle

ORACLES = ("colour",)
COLOUR_DATASETS = ("biased_mnist",)


def build_oracle(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> Oracle:
    """The oracle of ``cfg`` (conf/oracle/*.yaml) for a checkpoint with metadata ``meta``.

    Checks that the oracle fits the checkpoint's dataset and raises ValueError with one line otherwise.
    """
    name = cfg.get("name")
    if name not in ORACLES:
        raise ValueError(f"oracle={name!r} is not known; available: {list(ORACLES)}")
    dataset = meta["config"]["dataset"]["name"]
    if name == "colour":
        extra = set(cfg) - {"name", "allowed_colours", "max_distance", "min_confidence"}
        if extra:
            raise ValueError(f"oracle.{sorted(extra)[0]} is not an option of oracle=colour "
                             "(options: allowed_colours, max_distance, min_confidence)")
        if dataset not in COLOUR_DATASETS:
            raise ValueError(f"oracle=colour does not fit dataset {dataset!r} of this checkpoint: it reads "
                             f"background colours, for {list(COLOUR_DATASETS)}; use an oracle for {dataset}")
        colours = cfg.get("allowed_colours") or meta["bias_names"]
        missing = [c for c in meta["bias_names"] if c not in colours]
        if missing:
            raise ValueError(f"oracle.allowed_colours={list(colours)} lacks the checkpoint's bias colour(s) "
                             f"{missing}; every class colour must be allowed")
        # bias value k must be the colour of class k: the checkpoint's colours first, extra allowed ones after
        ordered = list(meta["bias_names"]) + [c for c in colours if c not in meta["bias_names"]]
        return ColourOracle(ordered, max_distance=cfg.get("max_distance", 80.0),
                            min_confidence=cfg.get("min_confidence", 0.2))
    raise AssertionError(name)  # unreachable: ORACLES lists every branch


__all__ = ["ORACLES", "ColourOracle", "Oracle", "OracleOutput", "build_oracle"]
