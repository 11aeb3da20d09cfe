"""Speed switches shared by training, counting and the benchmark: bf16 autocast, channels_last, torch.compile.

Every switch takes ``true``, ``false`` or ``"auto"``; auto means on for a CUDA device and off otherwise, so the
same config runs fast on a GPU and exactly as before on a CPU. Precision takes ``fp32``, ``bf16`` or ``auto``
(bf16 on CUDA, fp32 elsewhere). A value outside these is a :class:`~biasamp.errors.UsageError` naming the key.

Numerics: EDMPrecond computes the preconditioning in fp32 and casts F(x) to fp32, so running the network under
bf16 autocast keeps D(x) fp32 with only the network's matmuls and convolutions in bf16. Training keeps fp32
master weights, loss and EMA (Lightning's ``bf16-mixed`` autocasts the forward only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from biasamp.errors import UsageError

SWITCH_VALUES = (True, False, "auto")
PRECISIONS = ("fp32", "bf16", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def device_type(device: torch.device | str | None) -> str:
    """'cuda', 'cpu', ... of a device, a device string, or a Lightning accelerator name (gpu, auto)."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        return "cuda"
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        return str(device)


def check_switch(key: str, value: Any) -> None:
    if not any(value is v or (isinstance(v, str) and value == v) for v in SWITCH_VALUES):
        raise UsageError(f"{key}={value!r} is not allowed: use true, false or auto (auto: on for CUDA)")


def resolve_switch(key: str, value: Any, device: torch.device | str | None) -> bool:
    """true/false as given; auto: True on a CUDA device, False otherwise."""
    check_switch(key, value)
    return device_type(device) == "cuda" if value == "auto" else bool(value)


def check_precision(key: str, value: Any) -> None:
    if value not in PRECISIONS:
        raise UsageError(f"{key}={value!r} is not allowed: use fp32, bf16 or auto (auto: bf16 on CUDA)")


def resolve_precision(key: str, value: Any, device: torch.device | str | None) -> str:
    """'fp32' or 'bf16'; auto: bf16 on a CUDA device, fp32 otherwise."""
    check_precision(key, value)
    if value == "auto":
        return "bf16" if device_type(device) == "cuda" else "fp32"
    return str(value)


def check_compile_mode(key: str, value: Any) -> None:
    if value not in COMPILE_MODES:
        raise UsageError(f"{key}={value!r} is not allowed: use one of {', '.join(COMPILE_MODES)}")


def compile_module(module: nn.Module, mode: str = "default") -> Callable[..., Tensor]:
    """torch.compile(module) with static shapes (one graph per batch shape: a sampler sees only a few).

    The result shares ``module``'s parameters; keep it outside the module tree (a plain attribute or local)
    so state-dict keys never get an ``_orig_mod.`` prefix.
    """
    check_compile_mode("compile_mode", mode)
    return torch.compile(module, mode=None if mode == "default" else mode, dynamic=False)


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for precision 'bf16', nothing for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type(device), dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FastDenoiser:
    """Inference wrapper of an EDMPrecond: D(x, sigma, class_labels) -> float32, faster where asked.

    precision 'bf16' runs the net under bf16 autocast (D stays fp32); ``channels_last`` converts the weights
    and the input to NHWC (faster convolutions on tensor cores); ``compile`` compiles the denoiser with
    ``compile_mode`` (``reduce-overhead`` adds CUDA graphs, whose outputs are copied so that the next call
    cannot overwrite them). A plain object, not a module: the denoiser's state dict is unchanged.
    With fp32, no channels_last and no compile it returns exactly what the denoiser returns.
    """

    def __init__(self, denoiser: nn.Module, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, compile_mode: str = "default") -> None:
        check_precision("precision", precision)
        if precision == "auto":
            raise ValueError("FastDenoiser needs a resolved precision (fp32 or bf16), got 'auto': resolve it first "
                             "with resolve_precision (or use fast_denoiser)")
        self.denoiser = denoiser.eval().requires_grad_(False)
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.compile_mode = compile_mode
        self._forward = compile_module(self.denoiser, compile_mode) if compile else self.denoiser
        self._copy_out = compile and compile_mode in ("reduce-overhead", "max-autotune")

    def __getattr__(self, name: str) -> Any:  # sigma_min, sigma_max, label_dim, net, ... of the denoiser
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def to(self, *args: Any, **kwargs: Any) -> FastDenoiser:
        self.denoiser.to(*args, **kwargs)
        if self.channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        return self

    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, x.device):
            out = self._forward(x, sigma, class_labels)
        out = out.to(torch.float32)
        return out.clone() if self._copy_out else out

    def __repr__(self) -> str:
        return (f"FastDenoiser(precision={self.precision}, channels_last={self.channels_last}, "
                f"compile={self.compile}, compile_mode={self.compile_mode})")


def fast_denoiser(denoiser: nn.Module, device: torch.device | str, precision: Any = "auto",
                  channels_last: Any = "auto", compile: Any = "auto", compile_mode: str = "default") -> FastDenoiser:
    """A :class:`FastDenoiser` with the auto switches resolved for ``device`` (the denoiser is moved there)."""
    check_compile_mode("compile_mode", compile_mode)
    return FastDenoiser(
        denoiser.to(device),
        precision=resolve_precision("precision", precision, device),
        channels_last=resolve_switch("channels_last", channels_last, device),
        compile=resolve_switch("compile", compile, device),
        compile_mode=compile_mode,
    )


# ---------------------------------------------------------------------------------------------- training
def check_train_speed(speed: Any) -> None:
    """Check the training config's ``speed`` block (missing keys take their defaults)."""
    speed = speed or {}
    allowed = ("compile", "compile_mode", "channels_last", "fused_adam")
    unknown = [k for k in speed if k not in allowed]
    if unknown:
        raise UsageError(f"speed.{unknown[0]} is not a known key: allowed keys are {', '.join(allowed)}")
    for key in ("compile", "channels_last", "fused_adam"):
        check_switch(f"speed.{key}", speed.get(key, "auto"))
    check_compile_mode("speed.compile_mode", speed.get("compile_mode", "default"))


def train_speed(speed: Any, device: torch.device | str | None) -> dict[str, Any]:
    """The resolved training switches: compile, compile_mode, channels_last, fused_adam."""
    speed = speed or {}
    check_train_speed(speed)
    return {
        "compile": resolve_switch("speed.compile", speed.get("compile", "auto"), device),
        "compile_mode": speed.get("compile_mode", "default"),
        "channels_last": resolve_switch("speed.channels_last", speed.get("channels_last", "auto"), device),
        "fused_adam": resolve_switch("speed.fused_adam", speed.get("fused_adam", "auto"), device),
    }


def accepts_fused(optimizer_factory: Callable[..., Any]) -> bool:
    """Whether an optimizer class (or a functools.partial of one) takes a ``fused`` argument (Adam, AdamW, SGD)."""
    import inspect

    target = getattr(optimizer_factory, "func", optimizer_factory)
    try:
        return "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- batch size
CPU_BATCH = 64  # batch_size=auto off CUDA: memory is not the limit there, and larger batches gain little


def batch_from_memory(bytes_per_sample: float, free_bytes: float, fraction: float = 0.6, multiple: int = 64,
                      cap: int = 4096) -> int:
    """The largest multiple of ``multiple`` (at least ``multiple``, at most ``cap``) whose samples need no more
    than ``fraction`` of ``free_bytes`` at ``bytes_per_sample`` each."""
    if bytes_per_sample <= 0:
        return cap
    fit = int(fraction * free_bytes / bytes_per_sample) // multiple * multiple
    return max(multiple, min(cap, fit))


@torch.inference_mode()
def probe_batch_size(denoiser: FastDenoiser, image_shape: tuple[int, int, int], rows_per_sample: int,
                     device: torch.device | str, probe: int = 64, cap: int = 4096) -> int:
    """``batch_size=auto`` for sampling: on CUDA, one eager forward of ``probe`` samples (``rows_per_sample``
    network rows each: 2 with guidance) measures the peak memory per sample, and the batch is the largest
    multiple of 64 that fits in 60% of the free memory (the rest: the sampler's few image-sized tensors, the
    oracle, compiled graphs); elsewhere ``CPU_BATCH``."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH
    net = denoiser.denoiser  # eager: probing the compiled one would compile a shape never used again
    rows = probe * int(rows_per_sample)
    x = torch.randn(rows, *image_shape, device=device)
    labels = torch.zeros(rows, net.label_dim, device=device) if net.label_dim else None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with autocast(denoiser.precision, device):
        net(x, torch.ones(rows, device=device), labels)
    torch.cuda.synchronize(device)
    per_sample = (torch.cuda.max_memory_allocated(device) - before) / probe
    del x, labels
    free, _ = torch.cuda.mem_get_info(device)
    return batch_from_memory(per_sample, free, cap=cap)
