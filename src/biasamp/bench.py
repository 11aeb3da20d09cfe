"""Speed benchmark: ``python -m biasamp.bench [--workloads ...] [--out results.json] [--preset cpu-tiny]``.

For each workload it times the PLAIN path (fp32, eager, contiguous; sampling with separate cond and uncond
forwards) and the FAST path (bf16 autocast, channels_last, torch.compile, fused Adam; sampling with one batched
cond+uncond forward) in the same process, after warm-up, and prints a table of images/s, achieved TFLOP/s
(FLOPs from ``torch.utils.flop_counter.FlopCounterMode``), the fraction of a peak (``--peak-tflops``; 800 is
the H100's bf16 dense figure), the fast/plain ratio and the fast path's warm-up (compile) seconds. Timing uses
CUDA events on a GPU and ``perf_counter`` after a synchronize elsewhere. ``--preset cpu-tiny`` swaps in the
tiny net, batch 8 and a few steps: a CPU check of the whole tool in seconds.

Training workloads time the real training step of :class:`~biasamp.training.DiffusionModule` (loss, backward,
gradient clean-up and norm, optimizer step, EMA update) on GPU-resident random batches; sampling workloads
run the EDM Heun sampler (18 steps, 35 NFE) with guidance w = 1, i.e. 70 network rows per image.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from biasamp.atomic import atomic_write_json
from biasamp.models import EDMLoss, build_denoiser, one_hot
from biasamp.sampling import IndexNoise, apply_guidance, guided_denoiser, sample
from biasamp.speed import autocast, device_type, fast_denoiser, resolve_precision, resolve_switch

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # train | sample
    model: str  # conf/model/<model>.yaml
    img_resolution: int
    label_dim: int
    batch: int  # training batch, or samples per sampling batch
    n_samples: int = 0  # sampling: images generated in the timed part


WORKLOADS = {
    "train_bmnist": Workload("train_bmnist", "train", "ddpmpp_bmnist", 32, 2, 512),
    "train_64": Workload("train_64", "train", "ddpmpp_64", 64, 2, 64),
    "train_32": Workload("train_32", "train", "ddpmpp_32", 32, 10, 512),
    "sample_bmnist": Workload("sample_bmnist", "sample", "ddpmpp_bmnist", 32, 2, 512, 1024),
    "sample_64": Workload("sample_64", "sample", "ddpmpp_64", 64, 2, 512, 1024),
    "sample_32": Workload("sample_32", "sample", "ddpmpp_32", 32, 10, 512, 1024),
}
SAMPLER = {"name": "edm", "solver": "heun", "num_steps": 18, "sigma_min": None, "sigma_max": None, "rho": 7.0,
           "s_churn": 0.0, "s_min": 0.0, "s_max": math.inf, "s_noise": 1.0, "n_skipped_steps": 0}
GUIDANCE = 1.0


def model_config(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONF_MODEL / f"{name}.yaml").read_text())


class Timer:
    """Elapsed seconds of a block: CUDA events on a GPU, perf_counter after a synchronize elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


# ------------------------------------------------------------------------------------------------ FLOPs
def _count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_flops_per_image(model_cfg: dict[str, Any], w: Workload, batch: int = 2) -> int:
    """Forward + backward FLOPs of the denoiser per training image (fp32 eager, on the CPU)."""
    denoiser = build_denoiser(model_cfg, w.img_resolution, 3, w.label_dim).train()
    x = torch.randn(batch, 3, w.img_resolution, w.img_resolution)
    y = one_hot(torch.arange(batch) % w.label_dim, w.label_dim)
    return _count_flops(lambda: EDMLoss()(denoiser, x, y).mean().backward()) // batch


def forward_flops_per_row(model_cfg: dict[str, Any], w: Workload, batch: int = 2) -> int:
    """Forward FLOPs of one network row (one image at one sigma), on the CPU."""
    denoiser = build_denoiser(model_cfg, w.img_resolution, 3, w.label_dim).eval()
    x = torch.randn(batch, 3, w.img_resolution, w.img_resolution)
    with torch.no_grad():
        return _count_flops(lambda: denoiser(x, torch.ones(batch), None)) // batch


# ------------------------------------------------------------------------------------------------ training
def _train_runner(model_cfg: dict[str, Any], w: Workload, device: torch.device, fast: dict[str, Any],
                  batch: int) -> Callable[[int], None]:
    """A function running n real training steps (module, optimizer, EMA) with the given speed switches."""
    from biasamp.training import DiffusionModule, ema_beta

    torch.manual_seed(0)
    denoiser = build_denoiser(model_cfg, w.img_resolution, 3, w.label_dim)
    module = DiffusionModule(
        denoiser=denoiser, loss=EDMLoss(), optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
        lr_schedule=lambda n, total: 1.0, batch_total=batch, total_img=10**9, ema_halflife_kimg=500,
        ema_rampup_ratio=0.05, seed=0, log_every_n_steps=10**9, ema_loss_every_n_steps=0,
        compile=fast["compile"], compile_mode=fast["compile_mode"], channels_last=fast["channels_last"],
        fused_adam=fast["fused_adam"],
    ).to(device)
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, w.img_resolution, w.img_resolution), dtype=torch.uint8,
                           device=device, generator=gen)
    labels = torch.randint(0, w.label_dim, (batch,), device=device, generator=gen)
    data = (images, labels, torch.zeros_like(labels))

    def steps(n: int) -> None:
        for i in range(n):
            with autocast(fast["precision"], device):
                loss = module.training_step(data, i)
            loss.backward()
            module.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module.ema.update(module.denoiser, ema_beta(module.n_img, batch, module.ema_halflife_kimg,
                                                        module.ema_rampup_ratio))
            module.n_img += batch
            module._micro_in_step = 0

    return steps


# ------------------------------------------------------------------------------------------------ sampling
class SeparateGuidance:
    """The plain guided denoiser: D_cond and D_uncond from two separate forwards."""

    def __init__(self, net: Any, labels: torch.Tensor, guidance: float) -> None:
        self.net, self.labels, self.guidance = net, labels, guidance

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_cond = self.net(x, sigma, self.labels)
        d_uncond = self.net(x, sigma, torch.zeros_like(self.labels))
        return apply_guidance(d_cond, d_uncond, self.guidance)


def _sample_runner(model_cfg: dict[str, Any], w: Workload, device: torch.device, fast: dict[str, Any] | None,
                   batch: int, sampler: dict[str, Any]) -> Callable[[int, dict[str, Any] | None], None]:
    torch.manual_seed(0)
    denoiser = build_denoiser(model_cfg, w.img_resolution, 3, w.label_dim).eval().requires_grad_(False)
    if fast is None:
        net: Any = denoiser.to(device)
    else:
        net = fast_denoiser(denoiser, device, precision=fast["precision"], channels_last=fast["channels_last"],
                            compile=fast["compile"], compile_mode=fast["sample_compile_mode"])
    labels = one_hot(torch.arange(batch) % w.label_dim, w.label_dim).to(device)

    @torch.inference_mode()
    def run(n_images: int, sampler_cfg: dict[str, Any] | None = None) -> None:
        done = 0
        while done < n_images:
            b = min(batch, n_images - done)  # (a partial last batch is a new shape: keep n a multiple of batch)
            D = (SeparateGuidance(net, labels[:b], GUIDANCE) if fast is None
                 else guided_denoiser(net, labels[:b], guidance=GUIDANCE))
            noise = IndexNoise(1234, torch.arange(done, done + b, device=device), (3, w.img_resolution,
                               w.img_resolution), device=device)
            sample(D, noise, sampler_cfg or sampler, sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max)
            done += b

    return run


# ------------------------------------------------------------------------------------------------ driver
def _figures(images: int, seconds: float, flops_per_image: float, peak_tflops: float) -> dict[str, float]:
    img_s = images / seconds
    tflops = img_s * flops_per_image / 1e12
    return {"images": images, "seconds": seconds, "img_per_s": img_s, "tflops": tflops,
            "fraction_of_peak": tflops / peak_tflops}


# CUPTI's own bookkeeping, reported as device activity by some torch versions: not work the GPU did
_PROFILER_MARKERS = frozenset({"Command Buffer Full", "Activity Buffer Request", "Buffer Flush"})


def kernel_kind(name: str) -> str:
    """What a GPU kernel does, from its name: "matmul/conv" (tensor-core GEMMs and convolutions: cuDNN's
    xmma/implicit-gemm, cuBLAS's nvjet/gemm, attention), "fused (triton)" (inductor's fused elementwise and
    norm kernels), "copy/layout" (dtype casts, NCHW<->NHWC transposes, memcpy/memset) or "other" (eager
    elementwise, reductions, depthwise resampling convs...). A heuristic on names, for the profile summary."""
    n = name.lower()
    if n.startswith("triton_tem"):
        return "matmul/conv"  # an inductor matmul template
    if n.startswith("triton"):
        return "fused (triton)"  # (its name lists the ops it fused, "convolution" among them: checked first)
    if any(k in n for k in ("copy", "nchwtonhwc", "nhwctonchw", "memcpy", "memset")):
        return "copy/layout"
    if any(k in n for k in ("gemm", "xmma", "nvjet", "cutlass", "flash", "fmha", "attention")):
        return "matmul/conv"
    return "other"


def profile(fn: Callable[[], Any], device: torch.device, top: int = 15) -> dict[str, Any]:
    """Where one call of ``fn`` spends its time, under torch.profiler. On CUDA it counts GPU kernels only
    (not the CPU ops that launch them, which would count each kernel twice, nor CUPTI's bookkeeping):
    ``busy_fraction`` = kernel time / wall time (near 1: the GPU is the bound; well under 1: launches or the
    host are), ``by_kind`` the kernel time per :func:`kernel_kind`, ``top`` the ``top`` kernels by time.
    Elsewhere it counts the CPU's self time per operator, and ``by_kind`` is left out."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    per_op: dict[str, list[float]] = {}  # name -> [calls, microseconds]
    for e in prof.events():
        if cuda:
            if (e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False)
                    or getattr(e, "activity_type", "") == "overhead" or e.name in _PROFILER_MARKERS):
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            entry = per_op.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += us
    total_us = sum(us for _, us in per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: kv[1][1], reverse=True)
    summary: dict[str, Any] = {
        "wall_ms": wall_ms, "busy_ms": total_us / 1e3, "busy_fraction": total_us / 1e3 / wall_ms,
        "top": [{"op": name, "calls": int(calls), "self_ms": us / 1e3, "share": us / total_us}
                for name, (calls, us) in ranked[:top]],
    }
    if cuda:
        kinds: dict[str, float] = {}
        for name, (_, us) in per_op.items():
            kind = kernel_kind(name)
            kinds[kind] = kinds.get(kind, 0.0) + us / total_us
        summary["by_kind"] = dict(sorted(kinds.items(), key=lambda kv: kv[1], reverse=True))
    return summary


def _add_profile(figures: dict[str, Any], fn: Callable[[], Any], device: torch.device) -> None:
    """figures["profile"] = profile(fn); a profiler failure is recorded, not raised: the timings stand."""
    try:
        figures["profile"] = profile(fn, device)
    except Exception as err:
        figures["profile_error"] = f"{type(err).__name__}: {err}"


def run_workload(w: Workload, args: argparse.Namespace, device: torch.device, fast: dict[str, Any],
                 out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time one workload's plain and fast paths; the figures go into ``out`` as they are measured (so a
    caller keeps the plain path's figures when the fast path fails), which is also returned."""
    out = {} if out is None else out
    model_cfg = model_config("tiny" if args.preset == "cpu-tiny" else w.model)
    params = sum(p.numel() for p in build_denoiser(model_cfg, w.img_resolution, 3, w.label_dim).parameters())
    out.update({"workload": w.name, "kind": w.kind, "model": model_cfg["name"],
                "img_resolution": w.img_resolution, "label_dim": w.label_dim, "params": params,
                "date": datetime.now(UTC).isoformat(timespec="seconds")})  # a resumed report mixes runs
    if w.kind == "train":
        batch = args.batch or w.batch
        flops = train_flops_per_image(model_cfg, w)
        out.update(batch=batch, flops_per_image=flops)
        for path, switches in (("plain", PLAIN), ("fast", fast)):
            steps = _train_runner(model_cfg, w, device, switches, batch)
            with Timer(device) as warm:
                steps(args.warmup)
            with Timer(device) as timed:
                steps(args.steps)
            out[path] = {**_figures(batch * args.steps, timed.seconds, flops, args.peak_tflops),
                         "warmup_s": warm.seconds}
            if args.profile:
                _add_profile(out[path], lambda: steps(1), device)  # noqa: B023 - called right here
            del steps
    else:
        batch = args.sample_batch or w.batch
        n_images = args.n_samples or w.n_samples
        sampler = {**SAMPLER, "num_steps": args.sample_steps}
        nfe = 2 * args.sample_steps - 1  # Heun
        rows_per_image = 2 * nfe  # guidance: a cond and an uncond row per evaluation
        flops = forward_flops_per_row(model_cfg, w) * rows_per_image
        out.update(batch=batch, n_samples=n_images, num_steps=args.sample_steps, nfe_per_image=nfe,
                   rows_per_image=rows_per_image, guidance=GUIDANCE, flops_per_image=flops)
        for path, switches in (("plain", None), ("fast", fast)):
            run = _sample_runner(model_cfg, w, device, switches, batch, sampler)
            with Timer(device) as warm:  # every shape the timed part sees, compiled (a 2-step schedule)
                run(min(batch, n_images), {**sampler, "num_steps": 2})
            with Timer(device) as timed:
                run(n_images)
            out[path] = {**_figures(n_images, timed.seconds, flops, args.peak_tflops), "warmup_s": warm.seconds}
            if args.profile:
                _add_profile(out[path], lambda: run(min(batch, n_images)), device)  # noqa: B023
            del run
    out["fast_over_plain"] = out["fast"]["img_per_s"] / out["plain"]["img_per_s"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


PLAIN = {"precision": "fp32", "channels_last": False, "compile": False, "compile_mode": "default",
         "sample_compile_mode": "default", "fused_adam": False}


def _switch(value: str) -> bool | str:
    return {"true": True, "false": False}.get(value, value)


def fast_switches(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "precision": resolve_precision("--precision", args.precision, device),
        "channels_last": resolve_switch("--channels-last", _switch(args.channels_last), device),
        "compile": resolve_switch("--compile", _switch(args.compile), device),
        "compile_mode": args.compile_mode,
        "sample_compile_mode": args.sample_compile_mode,
        "fused_adam": resolve_switch("fused_adam", "auto", device),
    }


def table(results: list[dict[str, Any]], peak: float) -> str:
    head = (f"| workload | model | params | batch | GFLOP/img | plain img/s | fast img/s | fast/plain | "
            f"plain TFLOP/s | fast TFLOP/s | fast % of {peak:g} | fast warm-up s |")
    lines = [head, "|" + "---|" * 12]
    for r in results:
        if "error" in r:
            message = r["error"].splitlines()[0].replace("|", "\\|")[:200]
            lines.append(f"| {r['workload']} | FAILED: {message} |" + " |" * 10)
            continue
        p, f = r["plain"], r["fast"]
        lines.append(f"| {r['workload']} | {r['model']} | {r['params'] / 1e6:.2f} M | {r['batch']} | "
                     f"{r['flops_per_image'] / 1e9:.3g} | {p['img_per_s']:.1f} | {f['img_per_s']:.1f} | "
                     f"{r['fast_over_plain']:.2f} | {p['tflops']:.3g} | {f['tflops']:.3g} | "
                     f"{100 * f['fraction_of_peak']:.3g}% | {f['warmup_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m biasamp.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the results as JSON here (rewritten after every workload)")
    ap.add_argument("--resume", type=Path, default=None,
                    help="keep the finished workloads of this earlier JSON (same device, torch and options) and "
                         "run only the others: a benchmark split over several commands ends in one report")
    ap.add_argument("--preset", choices=("full", "cpu-tiny"), default="full",
                    help="cpu-tiny: tiny net, batch 8, 3 steps, 8 samples of a 2-step sampler (a CPU check)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; cpu-tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up training steps (default 5; cpu-tiny 2)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: per workload)")
    ap.add_argument("--sample-batch", type=int, default=None, help="samples per batch (default 512)")
    ap.add_argument("--n-samples", type=int, default=None, help="samples timed per workload (default 1024)")
    ap.add_argument("--sample-steps", type=int, default=None, help="EDM Heun steps (default 18: 35 NFE)")
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="peak for the %% column (H100 bf16 dense 800)")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="of the fast path")
    ap.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                    help="torch.compile in the fast path (auto: on CUDA; true on a CPU checks the compiled path)")
    ap.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto",
                    help="channels_last in the fast path (auto: on CUDA)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the training step")
    ap.add_argument("--sample-compile-mode", default="reduce-overhead", help="torch.compile mode for sampling")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one training step / one sampling batch of each path (torch.profiler): the "
                         "top operators by self time go to the JSON and to stderr")
    args = ap.parse_args(argv)
    tiny = args.preset == "cpu-tiny"
    defaults = {"steps": 3 if tiny else 20, "warmup": 2 if tiny else 5, "batch": 8 if tiny else None,
                "sample_batch": 8 if tiny else None, "n_samples": 8 if tiny else None,
                "sample_steps": 2 if tiny else 18}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        ap.error(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    args.workloads = names
    for key in ("steps", "warmup", "sample_steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


# settings that must match for --resume to add to an earlier report (its figures must be comparable)
RESUME_KEYS = ("preset", "steps", "warmup", "batch", "sample_batch", "n_samples", "sample_steps", "peak_tflops",
               "precision", "compile", "channels_last", "compile_mode", "sample_compile_mode", "profile")


def load_resume(path: Path, device_name: str, fast: dict[str, Any],
                args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """An earlier report's workload entries (failed ones included) and the workloads it was asked for, after
    checking it was measured like this run; else exit 2."""
    if not path.is_file():
        raise SystemExit(f"biasamp.bench: --resume {path}: no such file (give the JSON an earlier run wrote)")
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"biasamp.bench: --resume {path}: not JSON ({err}); give the JSON an earlier run "
                         "wrote") from None
    if not isinstance(old, dict) or not isinstance(old.get("workloads"), list):
        raise SystemExit(f"biasamp.bench: --resume {path}: not a biasamp.bench report (no 'workloads' list)")
    mine = {"device": device_name, "torch": torch.__version__, "fast_path": fast,
            **{f"config.{k}": getattr(args, k) for k in RESUME_KEYS}}
    theirs = {"device": old.get("device"), "torch": old.get("torch"), "fast_path": old.get("fast_path"),
              **{f"config.{k}": (old.get("config") or {}).get(k) for k in RESUME_KEYS}}
    differ = [k for k in mine if mine[k] != theirs[k]]
    if differ:
        k = differ[0]
        raise SystemExit(f"biasamp.bench: --resume {path}: {k} is {theirs[k]!r} there but {mine[k]!r} in this run; "
                         "its figures would not be comparable: rerun with the same options or without --resume")
    requested = old.get("requested") or (old.get("config") or {}).get("workloads") or []
    return old["workloads"], [str(w) for w in requested]


def _profile_line(figures: dict[str, Any]) -> str:
    prof = figures.get("profile")
    if prof is None:
        return str(figures.get("profile_error"))
    kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in prof.get("by_kind", {}).items())
    top = ", ".join(f"{e['op'][:60]} {100 * e['share']:.0f}%" for e in prof["top"][:4])
    return f"busy {100 * prof['busy_fraction']:.0f}% of {prof['wall_ms']:.1f} ms" + (f"; {kinds}" if kinds else "") \
        + f"; top: {top}"


def _error_entry(w: str, err: BaseException, partial: dict[str, Any]) -> dict[str, Any]:
    """A failed workload: what it measured before failing, the error's first line and the traceback's end."""
    first = (str(err).splitlines() or [""])[0]
    tail = traceback.format_exception(err)[-6:]
    return {**partial, "workload": w, "error": f"{type(err).__name__}: {first}",
            "traceback": "".join(tail)[-4000:]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both paths (trainer=gpu sets it too); TF32 flags left at torch's
    fast = fast_switches(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"biasamp.bench: {name}, torch {torch.__version__}, fast path {fast}", file=sys.stderr)
    earlier, requested = load_resume(args.resume, name, fast, args) if args.resume is not None else ([], [])
    # keep the earlier report's finished workloads, and its failures that this run does not retry
    results = [r for r in earlier if "error" not in r or r["workload"] not in args.workloads]
    requested = [*requested, *(w for w in args.workloads if w not in requested)]
    done = {r["workload"] for r in results if "error" not in r}
    if done:
        print(f"biasamp.bench: --resume: kept {', '.join(sorted(done))} from {args.resume}", file=sys.stderr)
    report = {
        "device": name,
        "device_type": device_type(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "peak_tflops": args.peak_tflops,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fast_path": fast,
        "plain_path": PLAIN,
        "requested": requested,  # every workload asked for, by this run and the one it resumes
        "workloads": results,
        "complete": False,
    }
    if device.type != "cuda":
        report["note"] = f"{device.type.upper()} run: checks the tool, says nothing about GPU speed"
    if args.preset != "full":
        report["note"] = report.get("note", "") + f" (preset {args.preset}: tiny network, small batches)"

    for w in args.workloads:
        if w in done:
            continue
        partial: dict[str, Any] = {}
        try:
            r = run_workload(WORKLOADS[w], args, device, fast, partial)
        except Exception as err:  # one workload's failure (OOM, a compile error) must not lose the others
            traceback.print_exc()
            r = _error_entry(w, err, partial)
            print(f"biasamp.bench: {w} FAILED: {r['error']}", file=sys.stderr)
        if "error" in r:  # free what the failed workload held (its frames are gone now) before the next one
            gc.collect()
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            print(f"biasamp.bench: {w}: plain {r['plain']['img_per_s']:.1f} img/s, fast {r['fast']['img_per_s']:.1f} "
                  f"img/s ({r['fast_over_plain']:.2f}x)", file=sys.stderr)
            for path in ("plain", "fast") if args.profile else ():
                print(f"biasamp.bench: {w} {path} profile: {_profile_line(r[path])}", file=sys.stderr)
        results[:] = [*(x for x in results if x["workload"] != w), r]  # (the report holds this list)
        if args.out is not None:  # after every workload: a run cut off by a time limit keeps what it measured
            atomic_write_json(args.out, report)
    measured = {r["workload"] for r in results if "error" not in r}
    missing = [w for w in requested if w not in measured]
    report["complete"] = not missing
    if missing:
        print(f"biasamp.bench: not measured: {', '.join(missing)} (run them again with --resume "
              f"{args.out or '<this JSON>'})", file=sys.stderr)

    print(table(results, args.peak_tflops))
    if args.out is not None:
        atomic_write_json(args.out, report)
        print(f"biasamp.bench: wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["complete"] else 1)
