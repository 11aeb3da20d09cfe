"""Datasets with a controlled share of bias-aligned samples, and the MNIST sources they draw from."""

from biasamp.data.biased_mnist import BiasedMNIST, colourise, resize_uint8
from biasamp.data.mnist import load_mnist, read_idx
from biasamp.data.multicolor_mnist import MultiColorMNIST
from biasamp.data.palette import COLOUR_NAMES, PALETTE
from biasamp.data.registry import BUILDERS, build_dataset, check_dataset_config
from biasamp.data.rho import check_rho

__all__ = [
    "BUILDERS",
    "COLOUR_NAMES",
    "PALETTE",
    "BiasedMNIST",
    "MultiColorMNIST",
    "build_dataset",
    "check_dataset_config",
    "check_rho",
    "colourise",
    "load_mnist",
    "read_idx",
    "resize_uint8",
]
