"""Oracles: predict the bias attribute(s) of generated images (colour oracle; trained classifier oracle)."""

from collections.abc import Mapping
from typing import Any

from biasamp.errors import UsageError
from biasamp.oracles.base import Oracle, OracleOutput
from biasamp.oracles.classifier import ClassifierOracle
from biasamp.oracles.colour import ColourOracle
from biasamp.oracles.fidelity import CLASS_PRED, WithClassPrediction

ORACLES = ("colour", "classifier")
COLOUR_DATASETS = ("biased_mnist", "multicolor_mnist")


def build_oracle(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> Oracle:
    """The oracle of ``cfg`` (conf/oracle/*.yaml) for a checkpoint with metadata ``meta``.

    Checks that the oracle fits the checkpoint's dataset and raises UsageError with one line otherwise.
    """
    name = cfg.get("name")
    if name not in ORACLES:
        raise UsageError(f"oracle={name!r} is not known; available: {list(ORACLES)}")
    dataset = meta["config"]["dataset"]["name"]
    if name == "colour":
        extra = set(cfg) - {"name", "allowed_colours", "max_distance", "min_confidence"}
        if extra:
            raise UsageError(f"oracle.{sorted(extra)[0]} is not an option of oracle=colour "
                             "(options: allowed_colours, max_distance, min_confidence)")
        if dataset not in COLOUR_DATASETS:
            raise UsageError(f"oracle=colour does not fit dataset {dataset!r} of this checkpoint: it reads "
                             f"background colours, for {list(COLOUR_DATASETS)}; use an oracle for {dataset}")
        colours = cfg.get("allowed_colours") or meta["bias_names"]
        missing = [c for c in meta["bias_names"] if c not in colours]
        if missing:
            raise UsageError(f"oracle.allowed_colours={list(colours)} lacks the checkpoint's bias colour(s) "
                             f"{missing}; every class colour must be allowed")
        # bias value k must be the colour of class k: the checkpoint's colours first, extra allowed ones after
        ordered = list(meta["bias_names"]) + [c for c in colours if c not in meta["bias_names"]]
        regions = (meta.get("data") or {}).get("bias_attributes") or ["colour"]
        return ColourOracle(ordered, max_distance=cfg.get("max_distance", 80.0),
                            min_confidence=cfg.get("min_confidence", 0.2), regions=regions)
    if name == "classifier":
        extra = set(cfg) - {"name", "checkpoint", "min_confidence"}
        if extra:
            raise UsageError(f"oracle.{sorted(extra)[0]} is not an option of oracle=classifier "
                             "(options: checkpoint, min_confidence)")
        checkpoint = cfg.get("checkpoint")
        if not checkpoint or checkpoint == "???":  # "???": left unset in conf/oracle/classifier.yaml
            raise UsageError("oracle=classifier needs oracle.checkpoint=<oracle.ckpt> (train one with "
                             "python -m biasamp.oracle)")
        min_confidence = cfg.get("min_confidence", 0.0)
        if min_confidence is None:
            min_confidence = 0.0
        attributes = (meta.get("data") or {}).get("bias_attributes") or []
        if len(attributes) > 1:
            raise UsageError(f"oracle=classifier predicts one attribute, but dataset {dataset!r} has {attributes}; "
                             "use oracle=colour")
        oracle = ClassifierOracle.from_checkpoint(str(checkpoint), min_confidence=float(min_confidence))
        names, wanted = oracle.value_names[0], [str(b) for b in meta["bias_names"]]
        if names != wanted:
            raise UsageError(f"oracle.checkpoint={checkpoint} predicts values {names}, but this checkpoint's bias "
                             f"values are {wanted} (dataset {dataset!r}); use an oracle trained with "
                             "attribute=bias on the same dataset and classes")
        return oracle
    raise AssertionError(name)  # unreachable: ORACLES lists every branch


def with_class_prediction(oracle: Oracle, class_oracle: str, meta: Mapping[str, Any]) -> Oracle:
    """``oracle`` plus the predicted class (column ``class_pred``) of the target classifier at ``class_oracle``."""
    classifier = ClassifierOracle.from_checkpoint(str(class_oracle))
    return WithClassPrediction(oracle, classifier, [str(c) for c in meta["class_names"]],
                               source=f"class_oracle={class_oracle}")


__all__ = ["CLASS_PRED", "ORACLES", "ClassifierOracle", "ColourOracle", "Oracle", "OracleOutput",
           "WithClassPrediction", "build_oracle", "with_class_prediction"]
