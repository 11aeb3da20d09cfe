"""LightningDataModule over an in-memory dataset, feeding index-drawn batches (see ``data.stream``)."""

from __future__ import annotations

import lightning as L
import torch

from biasamp.data.stream import BatchStream


class InMemoryDataModule(L.LightningDataModule):
    """Serves ``dataset.images/labels/biases`` as an endless, resumable, rank-sharded :class:`BatchStream`.

    Args:
        dataset: any biasamp dataset (uint8 ``images`` (N, C, H, W), ``labels``, ``biases``).
        batch_gpu: micro-batch size per device.
        seed: seed of the data order (same on every rank; ranks take disjoint slices).
        on_device: keep the dataset on the accelerator and gather batches there.
        weights: optional per-image float (N, K) tensor served as a fourth batch element (InvDiff's groups).
    """

    def __init__(self, dataset, batch_gpu: int, seed: int, on_device: bool = False, weights=None) -> None:
        super().__init__()
        self.weights = weights
        self.dataset = dataset
        self.batch_gpu = int(batch_gpu)
        self.seed = int(seed)
        self.on_device = bool(on_device)

    def train_dataloader(self) -> BatchStream:
        trainer = self.trainer
        device = trainer.strategy.root_device if self.on_device else torch.device("cpu")
        accumulate = int(trainer.accumulate_grad_batches)
        return BatchStream(
            self.dataset.images,
            self.dataset.labels,
            self.dataset.biases,
            batch_size=self.batch_gpu,
            seed=self.seed,
            rank=trainer.global_rank,
            world=trainer.world_size,
            start_batch=lambda: trainer.global_step * accumulate,
            device=device,
            weights=self.weights,
        )
