"""The in-memory dataset shape every biasamp dataset shares: items, length and a plain summary."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from biasamp.data.stream import to_model_range


class InMemoryBiasDataset(Dataset):
    """uint8 ``images`` (N, C, R, R), ``labels`` and ``biases`` held in memory, with their bias statistics.

    Subclasses set the attributes read by :meth:`summary` (name, split, source, seed, rho_requested, class and
    bias names, class_counts, rho_effective, rho_per_class, n_aligned, n_conflicting) in ``__init__``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    biases: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(float32 image (C, R, R) in [-1, 1], class index, bias index)."""
        return to_model_range(self.images[i]), int(self.labels[i]), int(self.biases[i])

    def summary(self) -> dict:
        """Plain-Python description (JSON/YAML safe) of what was built."""
        return {
            "name": self.name,
            "split": self.split,
            "source": self.source,
            "n": len(self),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "bias_names": list(self.bias_names),
            "rho_requested": self.rho_requested,
            "rho_effective": self.rho_effective,
            "rho_per_class": list(self.rho_per_class),
            "n_aligned": self.n_aligned,
            "n_conflicting": self.n_conflicting,
            "class_counts": list(self.class_counts),
            "seed": self.seed,
        }
