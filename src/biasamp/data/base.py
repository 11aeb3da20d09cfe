"""The in-memory dataset shape every biasamp dataset shares: items, length and a plain summary."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from biasamp.data.stream import to_model_range


class InMemoryBiasDataset(Dataset):
    """uint8 ``images`` (N, C, R, R), ``labels`` and ``biases`` held in memory, with their bias statistics.

    Subclasses set the attributes read by :meth:`summary` (name, split, source, seed, rho_requested, class and
    bias names, bias_attributes, class_counts, rho_effective, rho_per_class, n_aligned, n_conflicting) in
    ``__init__``. ``biases`` is (N,) for one bias attribute, or (N, A) with one column per attribute (then the
    subclass also sets ``rho_by_attribute`` and ``rho_per_class_by_attribute``; the single-value statistics are
    those of the first attribute). Value k of every attribute is aligned with class k.
    """

    bias_attributes: list[str]

    images: torch.Tensor
    labels: torch.Tensor
    biases: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        """(float32 image (C, R, R) in [-1, 1], class index, bias index or int64 (A,) bias indices)."""
        bias = self.biases[i]
        return to_model_range(self.images[i]), int(self.labels[i]), int(bias) if bias.ndim == 0 else bias.clone()

    def attribute_stats(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(rho per bias attribute, per-class rho per bias attribute)."""
        if len(self.bias_attributes) == 1:
            name = self.bias_attributes[0]
            return {name: self.rho_effective}, {name: list(self.rho_per_class)}
        return dict(self.rho_by_attribute), {a: list(v) for a, v in self.rho_per_class_by_attribute.items()}

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
            "bias_attributes": list(self.bias_attributes),
            "rho_by_attribute": self.attribute_stats()[0],
            "rho_per_class_by_attribute": self.attribute_stats()[1],
            "rho_requested": self.rho_requested,
            "rho_effective": self.rho_effective,
            "rho_per_class": list(self.rho_per_class),
            "n_aligned": self.n_aligned,
            "n_conflicting": self.n_conflicting,
            "class_counts": list(self.class_counts),
            "seed": self.seed,
        }
