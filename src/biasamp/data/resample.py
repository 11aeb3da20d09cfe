"""The seed's rho resampling rule (``create_balanced_dataset``) for pooled real datasets.

A sample is *aligned* when its bias value equals its class index (bias value k goes with class k).
With n_c samples in class c, A_c of them aligned and C_c conflicting:

1. per class, target ``floor(n_c * rho)`` aligned and ``n_c - floor(n_c * rho)`` conflicting;
2. ``a = min_c min(A_c, target aligned of c)``, ``c = min_c min(C_c, target conflicting of c)``;
3. if ``a / (a + c) > rho``: keep ``c`` conflicting and take ``floor(c * rho / (1 - rho))`` aligned,
   otherwise keep ``a`` aligned and take ``floor(a * (1 - rho) / rho)`` conflicting
   (``rho = 0``: 0 aligned and ``c`` conflicting);
4. draw that many aligned and that many conflicting samples, without replacement, from every class.

Every class ends up with the same number of samples and the same aligned share. ``floor(x + 1e-9)``
stands in for the seed's ``int(x)`` so that float artefacts (``100 * 0.29 = 28.999...``) do not lose one.
"""

from __future__ import annotations

import math

import numpy as np

from biasamp.data.rho import check_rho
from biasamp.errors import UsageError


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)


def resample_counts(labels: np.ndarray, biases: np.ndarray, rho: float, num_classes: int) -> tuple[int, int]:
    """(aligned, conflicting) samples per class that the rule keeps; UsageError when rho is unreachable."""
    labels = np.asarray(labels)
    biases = np.asarray(biases)
    avail_a = [int(((labels == k) & (biases == k)).sum()) for k in range(num_classes)]
    avail_c = [int(((labels == k) & (biases != k)).sum()) for k in range(num_classes)]
    n = [a + c for a, c in zip(avail_a, avail_c, strict=True)]
    target_a = [min(nc, _floor(nc * rho)) for nc in n]
    target_c = [nc - t for nc, t in zip(n, target_a, strict=True)]
    a = min(min(x, t) for x, t in zip(avail_a, target_a, strict=True))
    c = min(min(x, t) for x, t in zip(avail_c, target_c, strict=True))
    if rho == 0.0:
        n_aligned, n_conflicting = 0, c
    elif a + c > 0 and a / (a + c) > rho:
        n_aligned, n_conflicting = _floor(c * rho / (1.0 - rho)), c
    else:
        n_aligned, n_conflicting = a, _floor(a * (1.0 - rho) / rho)
    empty = n_aligned + n_conflicting == 0
    lost_share = 0.0 < rho < 1.0 and (n_aligned == 0 or n_conflicting == 0)
    if empty or lost_share:
        amin, cmin = min(avail_a), min(avail_c)
        low = f"{1 / (cmin + 1):.4g}" if cmin else "none"
        high = f"{amin / (amin + 1):.4g}" if amin else "none"
        raise UsageError(
            f"dataset.rho={rho} cannot be reached with these data: the resampling keeps {n_aligned} aligned and "
            f"{n_conflicting} conflicting samples per class (available per class: aligned {avail_a}, "
            f"conflicting {avail_c}). Achievable: rho in about [{low}, {high}]"
            f"{', rho=0' if cmin else ''}{', rho=1' if amin else ''}, or rho=null to keep the split as it is"
        )
    return n_aligned, n_conflicting


def rho_resample(
    labels: np.ndarray, biases: np.ndarray, rho: float, seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of the samples the seed's rule keeps for ``rho``, grouped by class, aligned first.

    ``num_classes`` defaults to ``max(labels) + 1``. Deterministic given ``seed`` (one numpy Generator,
    classes in order, aligned drawn before conflicting).
    """
    labels = np.asarray(labels, dtype=np.int64)
    biases = np.asarray(biases, dtype=np.int64)
    if rho is None:
        raise ValueError("rho_resample needs a number in [0, 1], got None (None keeps the split: do not resample)")
    rho = check_rho(rho, "dataset.rho", allow_null=False)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    if num_classes == 0:
        raise UsageError(f"dataset.rho={rho}: the data holds no samples to resample; check dataset.data_dir and "
                         "dataset.split")
    n_aligned, n_conflicting = resample_counts(labels, biases, rho, num_classes)
    rng = np.random.default_rng(int(seed))
    parts: list[np.ndarray] = []
    for k in range(num_classes):
        aligned = np.flatnonzero((labels == k) & (biases == k))
        conflicting = np.flatnonzero((labels == k) & (biases != k))
        parts.append(rng.permutation(aligned)[:n_aligned])
        parts.append(rng.permutation(conflicting)[:n_conflicting])
    return np.concatenate(parts).astype(np.int64)
