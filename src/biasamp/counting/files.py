"""Older import path of the count job's file formats; each format now has its own module:
``counting.counts`` (counts.csv), ``counting.meta`` (meta.json), ``counting.results`` (results.csv) and
``counting.state`` (state.json)."""

from biasamp.counting.counts import counts_table, matrix, write_counts, write_matrices
from biasamp.counting.results import update_results

__all__ = ["counts_table", "matrix", "update_results", "write_counts", "write_matrices"]
