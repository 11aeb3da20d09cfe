"""The one check of a requested rho (the share of bias-aligned samples), used by every dataset builder.

A rho is a number in [0, 1]. Where a builder can give each class its own share (Biased MNIST, Multi-Color
MNIST), it may also be a list with one number per used class. Where the data already has a split of its own
(Waterbirds, BFFHQ), ``null`` keeps that split as it is; the MNIST builders draw the aligned share themselves,
so there ``null`` means nothing and is refused.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from biasamp.errors import UsageError

NULL_DATASETS = ("waterbirds", "bffhq")  # the builders for which rho=null keeps the data's own split


def _is_share(value: object) -> bool:
    """A real number (not a bool) in [0, 1]; NaN and infinities are not."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
            and 0.0 <= float(value) <= 1.0)


def check_rho(value: object, key: str = "dataset.rho", allow_null: bool = False,
              num_classes: int | None = None) -> float | list[float] | None:
    """``value`` as a float in [0, 1], as a list of ``num_classes`` such floats, or None; else UsageError.

    Args:
        value: the requested rho.
        key: the config key named in the message (``dataset.rho``, ``dataset.rho_left``, ``rho``, ...).
        allow_null: whether None is allowed (it keeps the data's own split: Waterbirds, BFFHQ).
        num_classes: the number of used classes K when a per-class list is allowed; None: one number only.

    Returns None, a float, or a list of K floats (a list is returned as a list, a number as a number).
    """
    if value is None:
        if allow_null:
            return None
        raise UsageError(f"{key}=null is not allowed for this dataset: give a number in [0, 1]"
                         f"{_list_hint(num_classes)}; null (keep the data's own split) exists only for "
                         f"{' and '.join(NULL_DATASETS)}")
    if _is_share(value):
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes) and num_classes is not None:
        values = list(value)
        if len(values) != num_classes:
            raise UsageError(f"{key}={values!r} has {len(values)} values; a per-class list needs one per used "
                             f"class ({num_classes}), or give one number in [0, 1] for all classes")
        bad = [v for v in values if not _is_share(v)]
        if bad:
            raise UsageError(f"{key}={values!r}: {bad!r} not in [0, 1]; every value must be a number in [0, 1]")
        return [float(v) for v in values]
    null = ", or null to keep the data's own split" if allow_null else ""
    raise UsageError(f"{key}={value!r} is not allowed: give a number in [0, 1]{_list_hint(num_classes)}{null}")


def _list_hint(num_classes: int | None) -> str:
    return f" or a list of {num_classes} such numbers (one per used class)" if num_classes is not None else ""


def per_class_rho(rho: float | list[float], num_classes: int) -> list[float]:
    """A checked rho (:func:`check_rho`) as one float per class."""
    return list(rho) if isinstance(rho, list) else [float(rho)] * num_classes
