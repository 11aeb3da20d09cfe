"""Class fidelity: a bias oracle joined with a trained class classifier, so that every generated sample also
gets a predicted class.

The class classifier is an oracle checkpoint trained with ``python -m biasamp.oracle attribute=target`` (its
attribute is ``class``). Its prediction becomes one more count column, ``class_pred``, whose value k is class
k, so the share of samples of class c predicted as c, the class fidelity, is estimated exactly like rho (an
"aligned" share). Validity stays the bias oracle's: adding the classifier never changes the bias counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from biasamp.errors import UsageError
from biasamp.oracles.base import Oracle, OracleOutput
from biasamp.oracles.classifier import ClassifierOracle

CLASS_PRED = "class_pred"  # the count column of the predicted class


class WithClassPrediction:
    """``oracle``'s attributes, then ``class_pred`` from ``classifier`` (value names: the model's classes)."""

    def __init__(self, oracle: Oracle, classifier: ClassifierOracle, class_names: Sequence[str],
                 source: str = "class_oracle") -> None:
        predicted = list(classifier.value_names[0])
        if classifier.attributes != ["class"] or predicted != [str(c) for c in class_names]:
            raise UsageError(f"{source} predicts {classifier.attributes[0]!r} with values {predicted}, but this "
                             f"checkpoint's classes are {list(class_names)}; use an oracle trained with "
                             "attribute=target on the same dataset and classes")
        if CLASS_PRED in oracle.attributes:
            raise ValueError(f"the bias oracle already has a {CLASS_PRED!r} column")
        self.oracle, self.classifier = oracle, classifier
        self.attributes = [*oracle.attributes, CLASS_PRED]
        self.value_names = [*[list(v) for v in oracle.value_names], [str(c) for c in class_names]]
        self.confusion = oracle.confusion
        self.class_confusion = classifier.confusion

    def to(self, device: torch.device | str) -> WithClassPrediction:
        self.oracle.to(device)
        self.classifier.to(device)
        return self

    def __call__(self, images: Tensor) -> OracleOutput:
        bias, cls = self.oracle(images), self.classifier(images)
        return OracleOutput(bias=torch.cat([bias.bias, cls.bias.to(bias.bias.device)], dim=1),
                            confidence=torch.cat([bias.confidence, cls.confidence.to(bias.confidence.device)], dim=1),
                            valid=bias.valid)
