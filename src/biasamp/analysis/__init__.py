"""Analysis: counts -> rho_model with confidence intervals, oracle-error correction (never imports torch)."""

from biasamp.analysis.correction import (
    confusion_counts_for,
    confusion_matrix,
    correct_distribution,
    corrected_rho,
    per_class_counts_for,
)
from biasamp.analysis.estimates import (
    UNCOND,
    RhoEstimate,
    class_value_matrix,
    per_class_rho,
    rho_model_from_counts,
    uncond_marginal,
)
from biasamp.analysis.intervals import (
    METHODS,
    bootstrap_interval,
    clopper_pearson,
    jeffreys,
    proportion_interval,
    wilson,
)

__all__ = [
    "METHODS",
    "UNCOND",
    "RhoEstimate",
    "bootstrap_interval",
    "class_value_matrix",
    "clopper_pearson",
    "confusion_counts_for",
    "confusion_matrix",
    "correct_distribution",
    "corrected_rho",
    "jeffreys",
    "per_class_counts_for",
    "per_class_rho",
    "proportion_interval",
    "rho_model_from_counts",
    "uncond_marginal",
    "wilson",
]
