"""Analysis: counts -> rho_model with confidence intervals (no torch models imported here)."""

from biasamp.analysis.estimates import rho_model_from_counts
from biasamp.analysis.intervals import clopper_pearson

__all__ = ["clopper_pearson", "rho_model_from_counts"]
