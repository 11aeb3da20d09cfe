"""DDPM++ (SongUNet, "ddpmpp" architecture of Karras et al. 2022), layers included.

The network F maps a preconditioned image c_in * x, a noise label c_noise = ln(sigma) / 4 and a one-hot
class vector to the raw network output; `biasamp.models.precond.EDMPrecond` turns F into the denoiser D.

Structure (see docs/edm.md):
- embedding: positional noise embedding [sin, cos] (+ Linear of one_hot * sqrt(label_dim)), then
  Linear(C -> 4C), SiLU, Linear(4C -> 4C), SiLU;
- encoder: conv3x3, then per level a down block (from level 1 on) and `num_blocks` blocks;
- decoder: two blocks at the lowest resolution (in0 with attention, in1), then per level an up block (not at
  the lowest level) and `num_blocks + 1` blocks that each take one encoder skip;
  output GroupNorm -> SiLU -> conv3x3.

Shapes: images (B, C, H, W) with H = W = img_resolution; noise labels (B,); class labels (B, label_dim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biasamp.errors import UsageError

SKIP_SCALE = math.sqrt(0.5)  # residual and attention branches are summed, then scaled by sqrt(1/2)
ZERO_INIT = 1e-5  # "zero" layers: xavier_uniform scaled by 1e-5, so a fresh block starts near the identity
ATTN_INIT = math.sqrt(0.2)  # qkv projection: xavier_uniform scaled by sqrt(0.2)
NORM_EPS = 1e-6


def _init_(layer: nn.Linear | nn.Conv2d, scale: float = 1.0) -> None:
    """Xavier-uniform weight times `scale`, zero bias (fan_in/fan_out include the kernel area)."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def linear(in_features: int, out_features: int, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    _init_(layer, scale)
    return layer


def conv(in_channels: int, out_channels: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    """Stride-1 convolution with 'same' padding (kernel 1 or 3)."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    _init_(layer, scale)
    return layer


def group_norm_fits(channels: int) -> bool:
    """Whether ``channels`` split into min(32, channels // 4) equal groups (what :func:`group_norm` needs)."""
    groups = min(32, channels // 4)
    return groups >= 1 and channels % groups == 0


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, channels // 4) groups (at least 4 channels per group), eps 1e-6."""
    if not group_norm_fits(channels):
        raise UsageError(
            f"model.net.model_channels and model.net.channel_mult give a block of {channels} channels, which "
            "GroupNorm cannot split into min(32, channels // 4) equal groups (e.g. model_channels 32, 64 or 128)"
        )
    return nn.GroupNorm(min(32, channels // 4), channels, eps=NORM_EPS)


def positional_embedding(noise_labels: Tensor, channels: int, max_positions: float = 10000.0) -> Tensor:
    """Positional noise embedding, (B,) -> (B, channels), output order [sin, cos].

    Frequencies f_k = (1 / max_positions)^(k / (channels/2 - 1)), k = 0 .. channels/2 - 1 (endpoint=True:
    the last frequency is exactly 1 / max_positions).
    """
    half = channels // 2
    k = torch.arange(half, dtype=torch.float32, device=noise_labels.device)
    freqs = (1.0 / max_positions) ** (k / (half - 1))
    angles = torch.outer(noise_labels.to(torch.float32), freqs)  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Resample(nn.Module):
    """Depthwise FIR resampling by a factor 2 with the separable filter f f^T / (sum f)^2.

    down: stride-2 depthwise convolution (the [1, 1] filter is 2x2 average pooling);
    up: stride-2 depthwise transposed convolution with gain 4 (the [1, 1] filter is nearest-neighbour).
    (B, C, H, W) -> (B, C, H/2, W/2) or (B, C, 2H, 2W).

    A two-tap box filter ([1, 1], DDPM++'s) runs as ``avg_pool2d`` / nearest ``interpolate``, the same function:
    on an H100 the depthwise (transposed) convolutions were 15% of the GPU time of compiled bf16 64 px sampling
    (cuDNN's ``dgrad2d_c1_k1_nhwc`` and ``conv2d_grouped_direct_kernel``), work that compile can fuse as
    pooling and indexing but not as convolutions. Other filters keep the convolutions.
    """

    def __init__(self, channels: int, mode: str, resample_filter: Sequence[float]) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"Resample mode must be 'up' or 'down', got {mode!r}")
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        kernel = torch.outer(f, f) / f.sum() ** 2  # (k, k), sums to 1
        self.mode = mode
        self.channels = channels
        self.pad = (f.numel() - 1) // 2
        self.box = f.numel() == 2 and bool(f[0] == f[1])
        self.register_buffer("kernel", kernel.expand(channels, 1, -1, -1).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.box:
            return F.avg_pool2d(x, 2) if self.mode == "down" else F.interpolate(x, scale_factor=2, mode="nearest")
        kernel = self.kernel.to(x.dtype)
        if self.mode == "down":
            return F.conv2d(x, kernel, stride=2, padding=self.pad, groups=self.channels)
        return F.conv_transpose2d(x, kernel * 4, stride=2, padding=self.pad, groups=self.channels)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions; returns only the branch (add the residual outside).

    a = softmax(q^T k / sqrt(C)) v with q, k, v = 1x1 conv of GroupNorm(x); output = 1x1 conv(a).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv(channels, 3 * channels, 1, scale=ATTN_INIT)
        self.proj = conv(channels, channels, 1, scale=ZERO_INIT)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> three (B, 1 head, H*W tokens, C) tensors
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unsqueeze(2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C); default scale 1/sqrt(C)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(a)


class UNetBlock(nn.Module):
    """Residual block: x -> (x_skip + conv1(drop(SiLU(GN(conv0(SiLU(GN(x))) + A emb))))) * sqrt(1/2).

    Optional resampling (`up`/`down`, applied before conv0 and before the 1x1 skip conv) and optional
    single-head self-attention: x -> (x + attn(x)) * sqrt(1/2).
    (B, in_channels, H, W), emb (B, emb_channels) -> (B, out_channels, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0,
                 resample_filter: Sequence[float] = (1, 1)) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a UNetBlock cannot both upsample and downsample")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.resample = None
        if up or down:
            self.resample = Resample(in_channels, "up" if up else "down", resample_filter)
        self.norm0 = group_norm(in_channels)
        self.conv0 = conv(in_channels, out_channels, 3)
        self.affine = linear(emb_channels, out_channels)  # embedding -> per-channel bias (no adaptive scale)
        self.norm1 = group_norm(out_channels)
        self.conv1 = conv(out_channels, out_channels, 3, scale=ZERO_INIT)
        # 1x1 projection on the skip path whenever channels change or the block resamples
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = conv(in_channels, out_channels, 1)
        self.attn = SelfAttention(out_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.conv0(h)
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = self.skip(x) if self.skip is not None else x
        x = (x + h) * SKIP_SCALE
        if self.attn is not None:
            x = (x + self.attn(x)) * SKIP_SCALE
        return x


def block_channels(model_channels: int, channel_mult: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
    """(in, out) channels of every UNetBlock of :class:`DDPMpp`, encoder then decoder, in build order: the walk
    of ``DDPMpp.__init__`` without building anything (a config check uses it; a test pins it to the network)."""
    pairs: list[tuple[int, int]] = []
    channels, skips = model_channels, []
    for level, mult in enumerate(channel_mult):
        if level > 0:
            pairs.append((channels, channels))  # down block
        skips.append(channels)
        for _ in range(num_blocks):
            pairs.append((channels, model_channels * mult))
            channels = model_channels * mult
            skips.append(channels)
    for level, mult in reversed(list(enumerate(channel_mult))):
        pairs += [(channels, channels)] * (2 if level == len(channel_mult) - 1 else 1)  # in0, in1 | up block
        for _ in range(num_blocks + 1):
            pairs.append((channels + skips.pop(), model_channels * mult))
            channels = model_channels * mult
    return pairs


class DDPMpp(nn.Module):
    """DDPM++ U-Net F(x_in, c_noise, y) for EDM preconditioning.

    Args:
        img_resolution: input/output height = width, in pixels; divisible by 2^(len(channel_mult) - 1).
        in_channels, out_channels: image channels in and out.
        label_dim: number of classes (0 = unconditional; class labels are then ignored).
        model_channels: base channel count C; level i has C * channel_mult[i] channels.
        channel_mult: per-level channel multipliers; one level per entry, each halving the resolution.
        channel_mult_emb: embedding width = C * channel_mult_emb.
        num_blocks: residual blocks per level in the encoder (the decoder has num_blocks + 1).
        attn_resolutions: resolutions (pixels) that get single-head self-attention.
        dropout: dropout probability inside the residual blocks.
        label_dropout: probability that training replaces a sample's whole label vector by zeros.
        channel_mult_noise: noise-embedding width = C * channel_mult_noise.
        resample_filter: 1-D FIR filter of the up/down sampling ([1, 1] for DDPM++).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, channel_mult_noise: int = 1,
                 resample_filter: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.noise_channels = model_channels * channel_mult_noise
        if self.noise_channels < 4 or self.noise_channels % 2:
            raise UsageError(
                "model.net.model_channels * channel_mult_noise must be even and >= 4 for the positional "
                f"noise embedding, got {self.noise_channels}"
            )
        emb_channels = model_channels * channel_mult_emb
        attn_resolutions = tuple(attn_resolutions)
        blocks = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=tuple(resample_filter))

        # Mapping network: noise (+ label) embedding -> emb (B, emb_channels).
        self.map_label = linear(label_dim, self.noise_channels) if label_dim else None
        self.map_layer0 = linear(self.noise_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)

        # Encoder; `skip_channels` records the channels of every output the decoder will consume.
        self.enc = nn.ModuleDict()
        channels = model_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv(in_channels, model_channels, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **blocks)
            skip_channels.append(channels)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    channels, model_channels * mult, attention=res in attn_resolutions, **blocks)
                channels = model_channels * mult
                skip_channels.append(channels)

        # Decoder; blocks named "..._block{idx}" concatenate one encoder skip to their input.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(channels, channels, attention=True, **blocks)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(channels, channels, **blocks)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(channels, channels, up=True, **blocks)
            for idx in range(num_blocks + 1):
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    channels + skip_channels.pop(), model_channels * mult, attention=attention, **blocks)
                channels = model_channels * mult
        self.out_norm = group_norm(channels)
        self.out_conv = conv(channels, out_channels, 3, scale=ZERO_INIT)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W); noise_labels (B,); class_labels (B, label_dim) float or None (= zeros).

        Returns the raw network output (B, out_channels, H, W).
        """
        batch = x.shape[0]
        emb = positional_embedding(noise_labels, self.noise_channels)  # (B, C) [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                class_labels = x.new_zeros(batch, self.label_dim, dtype=torch.float32)
            elif class_labels.shape != (batch, self.label_dim):
                raise ValueError(f"class_labels must have shape ({batch}, {self.label_dim}), "
                                 f"got {tuple(class_labels.shape)}")
            if self.training and self.label_dropout > 0:
                # drop a sample's whole label vector, i.e. replace it by the null (all-zero) input
                keep = torch.rand(batch, 1, device=x.device) >= self.label_dropout
                class_labels = class_labels * keep.to(class_labels.dtype)
            emb = emb + self.map_label(class_labels * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
