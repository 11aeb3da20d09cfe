"""Batches drawn by index from an in-memory dataset, as a pure function of (seed, batch number).

All datasets in biasamp are small enough to live in memory as one uint8 tensor (Biased MNIST at
32 px is 150 MB for 50k images, Waterbirds at 64 px about 150 MB). Gathering a batch by index from
that tensor is a single indexing op, so per-item Python loading (which cannot feed thousands of images
per second) is avoided. With ``device="cuda"`` the tensor lives on the GPU and batches never cross
the PCIe bus.

The stream is deterministic: micro-batch ``b`` of rank ``r`` (out of ``world``) holds the positions
``[(b * world + r) * B, (b * world + r + 1) * B)`` of an endless sequence formed by concatenating
per-epoch permutations, epoch ``e`` permuted by a generator seeded with ``(seed, e)``. A resumed run
therefore continues with exactly the batches an uninterrupted run would have seen, and ranks never
see the same item within a global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_EPOCH_SEED_STRIDE = 1_000_003  # a prime; keeps (seed, epoch) pairs apart


class BatchStream:
    """An endless iterable of ``(images_uint8, labels, biases)`` micro-batches for one rank (with ``weights``:
    ``(images_uint8, labels, biases, weights)``, the per-item rows of that tensor, e.g. InvDiff's group weights).

    Args:
        images: uint8 (N, C, H, W) tensor, the whole dataset.
        labels: int64 (N,) class indices.
        biases: int64 (N,) or (N, A) bias indices.
        batch_size: micro-batch size on this rank.
        seed: base seed of the permutations.
        rank, world: this process's rank and the number of processes.
        start_batch: called at every ``iter()`` and returns the micro-batch number to start from
            (for a resumed run: optimizer steps done times gradient-accumulation rounds).
        device: where the dataset lives and batches are produced (``None``: where ``images`` is).
        weights: optional float (N, K) per-item tensor served beside each batch.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        biases: Tensor,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start_batch: Callable[[], int] = lambda: 0,
        device: torch.device | str | None = None,
        weights: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise ValueError(f"BatchStream expects uint8 images, got {images.dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        device = torch.device(device) if device is not None else images.device
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.biases = biases.to(device)
        if weights is not None and weights.shape[0] != images.shape[0]:
            raise ValueError(f"weights hold {weights.shape[0]} rows for {images.shape[0]} images")
        self.weights = None if weights is None else weights.to(device)
        self.n = images.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.start_batch = start_batch
        self._perm_cache: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        """The permutation of item indices used in ``epoch`` (int64 on the CPU)."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
            perm = torch.randperm(self.n, generator=gen)
            self._perm_cache = {epoch: perm}  # batches walk forward, one epoch cached is enough
        return perm

    def indices(self, batch: int) -> Tensor:
        """Dataset indices (int64, CPU) of micro-batch ``batch`` on this rank."""
        start = (batch * self.world + self.rank) * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self.permutation(e)[pos[sel] - e * self.n]
        return out

    def batch(self, batch: int) -> tuple[Tensor, ...]:
        idx = self.indices(batch).to(self.images.device, non_blocking=True)
        if self.weights is not None:
            return self.images[idx], self.labels[idx], self.biases[idx], self.weights[idx]
        return self.images[idx], self.labels[idx], self.biases[idx]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        b = self.start_batch()
        while True:
            yield self.batch(b)
            b += 1


def to_model_range(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (x / 127.5 - 1); float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images.float()
