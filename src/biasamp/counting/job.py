"""The sampling-and-counting loop of one count job, resumable after every batch and split over ranks.

Rows are the requested classes (and ``uncond``); row r's sample i uses the noise stream of
(row_seed(seed, class index), i), so its image depends on nothing else: not the batch size, not the number
of processes, not on interruptions. Each global batch covers the next ``batch_size * world`` indices of the
row; rank k takes the k-th slice, every rank's counts are summed (``reduce``) and the writer persists the
state before the next batch.

With distribution steering a sample also depends on its block, the indices [kB, (k+1)B) of its row steered
together: every forward then holds whole blocks (``batch_size`` rounded down to a multiple of B, at least one
block), ranks take whole blocks, and a job resumes at a block boundary, so a block's images are the same for any
batch size, number of processes or interruption.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from biasamp.counting.state import CountState
from biasamp.models import one_hot
from biasamp.oracles import Oracle
from biasamp.sampling import IndexNoise, guided_denoiser, sample
from biasamp.sampling.steering import HSpaceSteerer


def row_seed(seed: int, class_index: int) -> int:
    """The noise seed of one row (class index; the unconditional row uses index label_dim)."""
    return int(np.random.SeedSequence([seed, class_index]).generate_state(1, dtype=np.uint32)[0])


@dataclass(frozen=True)
class Row:
    name: str  # class name, or "uncond"
    class_index: int | None  # None: the unconditional row


@dataclass
class CountSetup:
    net: torch.nn.Module  # EDM-preconditioned denoiser D(x, sigma, class_labels), eval mode, on `device`
    oracle: Oracle
    sampler: Mapping[str, Any]
    guidance: float
    guidance_uncond: str
    guidance_interval: tuple[float, float] | None
    seed: int
    label_dim: int
    image_shape: tuple[int, int, int]
    device: torch.device
    pad_to: int | None = None  # generate every batch at this size (the tail sliced off): one shape, one compile
    steerer: HSpaceSteerer | None = None  # h-space steering of the class rows (sampling.steering)
    block: int = 1  # samples steered together (distribution steering's B; 1: every sample on its own)

    @property
    def count_shape(self) -> tuple[int, ...]:
        return (*[len(v) for v in self.oracle.value_names], 2)

    def generate(self, row: Row, indices: Tensor, pad: bool = True) -> tuple[Tensor, float]:
        """Images (B, C, H, W) in [-1, 1] of the given sample indices of ``row``, and NFE per image.

        With ``pad_to``, a short batch is filled up with the next indices and their images dropped: a sample's
        image depends only on its own index, so this changes no image, and a compiled denoiser (CUDA graphs)
        sees a single batch shape instead of compiling again for every last, shorter batch."""
        n = len(indices)
        if pad and self.pad_to is not None and 0 < n < self.pad_to:
            start = int(indices.max()) + 1
            indices = torch.cat([indices.cpu(), torch.arange(start, start + self.pad_to - n)])
        if self.steerer is not None and row.class_index is not None:
            if self.block > 1 and (int(indices[0]) % self.block or n % self.block):
                raise ValueError(f"steered rows are generated in whole blocks of {self.block}, got indices "
                                 f"{int(indices[0])}..{int(indices[n - 1])}")
            blocks = torch.div(indices.cpu(), self.block, rounding_mode="floor")
            groups = torch.unique(blocks, return_inverse=True)[1]  # block ids 0..G-1 within this call
            groups[n:] = -1  # padding rows: in no block's p_hat, never steered
        labels = None
        if row.class_index is not None:
            labels = one_hot(torch.full((len(indices),), row.class_index, dtype=torch.long), self.label_dim)
            labels = labels.to(self.device)
        denoiser = guided_denoiser(self.net, labels, guidance=self.guidance, uncond=self.guidance_uncond,
                                   interval=self.guidance_interval, label_dim=self.label_dim)
        key = row.class_index if row.class_index is not None else self.label_dim
        noise = IndexNoise(row_seed(self.seed, key), indices.to(self.device), self.image_shape, device=self.device)
        if self.steerer is None or row.class_index is None:
            x = sample(denoiser, noise, self.sampler, sigma_min=self.net.sigma_min, sigma_max=self.net.sigma_max)
        else:
            steered = self.steerer.denoiser(denoiser, row.class_index, groups)
            with self.steerer.attached(self.net):
                x = sample(steered, noise, self.sampler, sigma_min=self.net.sigma_min, sigma_max=self.net.sigma_max)
        return x[:n].clamp(-1.0, 1.0), float(denoiser.nfe)

    def classify(self, images: Tensor) -> np.ndarray:
        """Flattened counts over (value of each attribute..., valid) of a batch."""
        out = self.oracle(images)
        shape = self.count_shape
        cells = torch.cat([out.bias, out.valid.long().unsqueeze(1)], dim=1)  # (B, A + 1)
        strides = torch.tensor([int(np.prod(shape[i + 1:])) for i in range(len(shape))], device=cells.device)
        flat = (cells * strides).sum(dim=1)
        return torch.bincount(flat, minlength=int(np.prod(shape))).cpu().numpy().astype(np.int64)


@dataclass
class RunStats:
    images: int = 0  # generated in this session, all ranks
    seconds: float = 0.0
    nfe_per_image: float = float("nan")
    first_batch_s: float | None = None  # the first batch's wall time: compile and CUDA-graph capture land here
    first_batch_images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float | None:
        """Images/s after the first batch (None with a single batch): the speed once warm."""
        if self.first_batch_s is None or self.images <= self.first_batch_images:
            return None
        rest = self.seconds - self.first_batch_s
        return (self.images - self.first_batch_images) / rest if rest > 0 else None


@torch.inference_mode()
def run_rows(setup: CountSetup, state: CountState, rows: Sequence[Row], n_per_class: int, batch_size: int,
             rank: int = 0, world: int = 1, reduce: Callable[[np.ndarray], np.ndarray] = lambda a: a,
             on_batch: Callable[[CountState, int], None] = lambda state, n: None) -> RunStats:
    """Sample and count every row up to ``n_per_class`` samples, continuing from ``state``.

    ``reduce`` sums a counts array over ranks (identity for one process); ``on_batch(state, n_new)`` runs
    after each global batch on every rank (the writer persists the state there).
    """
    stats = RunStats()
    start_time = time.perf_counter()
    unit = setup.block if setup.steerer is not None else 1
    batch_size = max(batch_size // unit, 1) * unit  # whole blocks per forward
    for row in rows:
        state.row(row.name)
        start = state.done[row.name]
        if start % unit or n_per_class % unit:
            raise ValueError(f"row {row.name}: {start} samples counted of {n_per_class}, not whole blocks of {unit}")
        while start < n_per_class:
            stop = min(start + batch_size * world, n_per_class)
            lo = min(start + rank * batch_size, stop)
            hi = min(lo + batch_size, stop)
            delta = np.zeros(int(np.prod(setup.count_shape)), dtype=np.int64)
            if hi > lo:
                images, nfe = setup.generate(row, torch.arange(lo, hi))
                delta = setup.classify(images)
                stats.nfe_per_image = nfe
            delta = reduce(delta)
            if int(delta.sum()) != stop - start:
                raise RuntimeError(f"row {row.name}: counted {int(delta.sum())} samples for indices "
                                   f"{start}..{stop - 1}; the ranks disagree")
            state.add(row.name, delta, stop)
            stats.images += stop - start
            stats.seconds = time.perf_counter() - start_time
            if stats.first_batch_s is None:
                stats.first_batch_s, stats.first_batch_images = stats.seconds, stop - start
            on_batch(state, stop - start)
            start = stop
    stats.seconds = time.perf_counter() - start_time
    return stats


@torch.inference_mode()
def grid_images(setup: CountSetup, rows: Sequence[Row], per_row: int) -> Tensor:
    """The first ``per_row`` samples of every row (the same images the counts saw), (rows*per_row, C, H, W)."""
    # unpadded: a few images need no full batch (a compiled denoiser compiles this shape once per process);
    # steered in blocks: the first whole block(s), as counted
    unit = setup.block if setup.steerer is not None else 1
    n = -(-per_row // unit) * unit
    return torch.cat([setup.generate(row, torch.arange(n), pad=False)[0][:per_row] for row in rows])
