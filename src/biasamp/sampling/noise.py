"""Gaussian noise addressed by sample index: sample i of a job gets the same noise whatever the batch it runs in.

Every value is a pure function of (seed, sample index, draw, element), computed by a counter-based generator:
integer hashing of those four numbers, then Box-Muller. Nothing depends on batch size, batch order, the number of
processes, the device, or on how many samples were drawn before (so a resumed job continues the same streams).

Draw 0 is a sample's initial noise; the samplers use draw ``step + 1`` for the noise added at ``step``.

Hash: Wellons' ``lowbias32`` integer mixer, chained over the inputs. A stream's key is two independent 32-bit
chains (64 bits in all), so two streams (sample, draw) share values only with probability ~2^-64 per pair; an
element's bits are ``mix(mix(key_a ^ counter) ^ key_b)``. The arithmetic runs in int64 on values kept below 2^32,
with each 32-bit multiply split in 16-bit halves so no product overflows; the result is the same on every device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MIX_MUL_1 = 0x7FEB352D  # lowbias32 multipliers (Wellons, "Prospecting for hash functions")
_MIX_MUL_2 = 0x846CA68B
_CHAIN_A = 0x243F6A88  # two different starting states, for the two halves of a stream's key (digits of pi)
_CHAIN_B = 0x85A308D3
_SEED_SALT = 0x9E3779B9  # folded into the seed's high word so seed 0 does not start at state 0


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32: a bijection of [0, 2^32) with strong avalanche (int64 tensors holding 32-bit values)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_MUL_2)
    return x ^ (x >> 16)


def _absorb(state: Tensor, word: Tensor | int) -> Tensor:
    """One link of the hash chain: state' = mix(state ^ word), word a 32-bit value."""
    return _mix32(state ^ word)


def _stream_keys(seed: int, sample_idx: Tensor, draw: int) -> tuple[Tensor, Tensor]:
    """Two 32-bit keys (B,) per stream (seed, sample_idx[b], draw), from two independent hash chains."""
    seed64 = int(seed) & 0xFFFFFFFFFFFFFFFF
    draw64 = int(draw) & 0xFFFFFFFFFFFFFFFF
    words_before = (seed64 & _MASK32, (seed64 >> 32) ^ _SEED_SALT)
    words_after = (draw64 & _MASK32, draw64 >> 32)
    idx_lo, idx_hi = sample_idx & _MASK32, sample_idx >> 32
    keys = []
    for start in (_CHAIN_A, _CHAIN_B):
        state = torch.full_like(sample_idx, start)
        for word in words_before:
            state = _absorb(state, word)
        state = _absorb(_absorb(state, idx_lo), idx_hi)
        for word in words_after:
            state = _absorb(state, word)
        keys.append(state)
    return keys[0], keys[1]


def index_noise(seed: int, sample_idx: Tensor, draw: int, shape: tuple[int, ...],
                device: torch.device | str | None = None) -> Tensor:
    """Standard normal noise, float32 (B, *shape), for the samples ``sample_idx`` (B,) at draw ``draw``.

    Element j (in row-major order over ``shape``) of row b is a pure function of (seed, sample_idx[b], draw, j).
    Elements 2p and 2p+1 are the cosine and sine outputs of one Box-Muller pair; its two uniforms are 24-bit,
    in (0, 1), never 0, so every value is finite (|z| < 5.9).
    """
    device = torch.device(device) if device is not None else torch.as_tensor(sample_idx).device
    idx = torch.as_tensor(sample_idx, device=device).reshape(-1)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"sample_idx must be an integer tensor, got dtype {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and idx.device.type == "cpu" and int(idx.min()) < 0:  # on an accelerator: no host sync
        raise ValueError(f"sample_idx must be >= 0, got min {int(idx.min())}")
    if int(draw) < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    shape = tuple(int(s) for s in shape)
    n_elem = math.prod(shape)
    n_pairs = (n_elem + 1) // 2

    key_a, key_b = _stream_keys(seed, idx, draw)
    counter = torch.arange(2 * n_pairs, dtype=torch.int64, device=device)  # uniform 2p -> radius, 2p+1 -> angle
    bits = _absorb(_absorb(key_a[:, None], counter[None, :]), key_b[:, None])  # (B, 2 * n_pairs)
    uniform = ((bits >> 8).to(torch.float64) + 0.5) * 2.0**-24  # 24-bit uniform in (0, 1)
    u_radius, u_angle = uniform[:, 0::2], uniform[:, 1::2]
    radius = torch.sqrt(-2.0 * torch.log(u_radius))  # Box-Muller: r = sqrt(-2 ln u1), theta = 2 pi u2
    angle = (2.0 * math.pi) * u_angle
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1).reshape(idx.shape[0], -1)
    return z[:, :n_elem].to(torch.float32).reshape(idx.shape[0], *shape)


class IndexNoise:
    """The noise streams of one batch: ``noise(draw)`` is ``index_noise(seed, sample_idx, draw, shape)``.

    seed: the job's seed; sample_idx (B,) int: the global index of each row's sample; shape: one sample's shape,
    e.g. (C, H, W). Draw 0 is the initial noise; samplers use draw ``step + 1`` for the noise of ``step``.
    """

    def __init__(self, seed: int, sample_idx: Tensor, shape: tuple[int, ...],
                 device: torch.device | str | None = None) -> None:
        idx = torch.as_tensor(sample_idx)
        self.device = torch.device(device) if device is not None else idx.device
        self.seed = int(seed)
        self.sample_idx = idx.to(device=self.device).reshape(-1)
        self.shape = tuple(int(s) for s in shape)
        if self.sample_idx.dtype.is_floating_point or self.sample_idx.dtype == torch.bool:
            raise ValueError(f"sample_idx must be an integer tensor, got dtype {self.sample_idx.dtype}")
        self.sample_idx = self.sample_idx.to(torch.int64)

    @property
    def batch_size(self) -> int:
        return int(self.sample_idx.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def __call__(self, draw: int) -> Tensor:
        """float32 (B, *shape) standard normal noise of draw ``draw`` for every row."""
        return index_noise(self.seed, self.sample_idx, draw, self.shape, device=self.device)

    def subset(self, mask_or_idx: Tensor | list[int] | slice) -> IndexNoise:
        """The same per-sample streams for the rows selected by a boolean mask (B,), row indices, or a slice."""
        if not isinstance(mask_or_idx, slice):
            mask_or_idx = torch.as_tensor(mask_or_idx, device=self.sample_idx.device)
        return IndexNoise(self.seed, self.sample_idx[mask_or_idx], self.shape, device=self.device)

    def __repr__(self) -> str:
        return (f"IndexNoise(seed={self.seed}, batch_size={self.batch_size}, shape={self.shape}, "
                f"device={self.device})")
