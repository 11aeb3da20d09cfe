"""The LightningModule that trains an EDM-preconditioned denoiser with EMA and n_img accounting.

Conventions:
- ``n_img`` counts training images seen over all ranks and gradient-accumulation rounds; it advances by
  ``batch_total`` per optimizer step, drives the EMA half-life and the lr schedule, and is the x-axis of
  every logged metric.
- Randomness of micro-batch ``m`` on rank ``r`` (sigma, noise, label dropout, network dropout) comes from
  the global torch RNG reseeded with ``(seed, r, m)``; together with the index-seeded data stream this
  makes a resumed run bit-identical to an uninterrupted one and gives every rank its own noise.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from biasamp.checkpoints import FORMAT_VERSION
from biasamp.data.stream import to_model_range
from biasamp.models import EDMLoss, one_hot
from biasamp.speed import accepts_fused, compile_module
from biasamp.training.ema import EMA, ema_beta


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout.

    ``load_state_dict`` keeps the saved layout; a run resumed with another ``speed.channels_last`` would then
    feed fused Adam moments whose strides differ from the weights', which it does not handle. Registered as a
    load-state-dict post hook."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss stays NaN/Inf for too many consecutive steps."""


def micro_batch_seed(seed: int, rank: int, micro_batch: int) -> int:
    """A 63-bit seed for the RNG of one micro-batch on one rank, mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, rank, micro_batch]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class DiffusionModule(L.LightningModule):
    """Wraps ``denoiser`` (an :class:`~biasamp.models.EDMPrecond`) for training.

    Args:
        denoiser: the preconditioned network D(x; sigma, y).
        loss: the EDM loss (per-sample weighting).
        optimizer: a partial optimizer taking ``params`` (Hydra ``_partial_: true``).
        lr_schedule: factor(n_img, total_img) multiplying the base lr (see ``training.schedules``).
        batch_total: images per optimizer step over all ranks and accumulation rounds.
        total_img: images of the whole run (for schedules that need the end).
        ema_halflife_kimg, ema_rampup_ratio: EMA half-life in kimg and its ramp-up ratio (None: no ramp-up).
        seed: base seed of the run.
        log_every_n_steps: interval of metric logging (the only host syncs of the training loop).
        ema_loss_every_n_steps: interval of the EMA model's loss on the current batch (0: never).
        max_nonfinite_steps: stop with :class:`NonFiniteLossError` when the loss was NaN/Inf this many
            consecutive optimizer steps (checked at each logging step).
        metadata: plain data stored as the checkpoint's hyper-parameters (resolved config, dataset summary).
        compile, compile_mode: train through ``torch.compile(denoiser)`` (kept outside the module tree, so the
            state dict and the checkpoint format are unchanged).
        channels_last: NHWC weights and batches (faster convolutions on tensor cores).
        fused_adam: pass ``fused=True`` to the optimizer (when it takes the argument; CUDA).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        loss: EDMLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: Callable[[int, int], float],
        batch_total: int,
        total_img: int,
        ema_halflife_kimg: float,
        ema_rampup_ratio: float | None,
        seed: int,
        log_every_n_steps: int = 50,
        ema_loss_every_n_steps: int = 500,
        max_nonfinite_steps: int = 100,
        metadata: Mapping[str, Any] | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        channels_last: bool = False,
        fused_adam: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            denoiser = denoiser.to(memory_format=torch.channels_last)
        self.denoiser = denoiser
        self.ema = EMA(denoiser)
        self.compile = bool(compile)
        self.compile_mode = str(compile_mode)
        self.fused_adam = bool(fused_adam)
        self._compiled: Any = None
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.batch_total = int(batch_total)
        self.total_img = int(total_img)
        self.ema_halflife_kimg = float(ema_halflife_kimg)
        self.ema_rampup_ratio = ema_rampup_ratio
        self.seed = int(seed)
        self.log_every_n_steps = int(log_every_n_steps)
        self.ema_loss_every_n_steps = int(ema_loss_every_n_steps)
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.label_dim = int(denoiser.label_dim)
        self.n_img = 0
        self._micro_in_step = 0
        self.save_hyperparameters(dict(metadata or {}))
        # running statistics between logging steps, kept on the device (no per-step host sync)
        self.register_buffer("_loss_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_loss_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_grad_norm", torch.zeros(()), persistent=False)
        self.register_buffer("_nonfinite_streak", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("_step_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)
        self.last_loss: float | None = None

    # ---------------------------------------------------------------- randomness
    def _accumulation(self) -> int:
        return int(self.trainer.accumulate_grad_batches) if self._trainer is not None else 1

    def _micro_batch_index(self) -> int:
        return self.global_step * self._accumulation() + self._micro_in_step

    def _reseed(self) -> None:
        rank = self.global_rank if self._trainer is not None else 0
        torch.manual_seed(micro_batch_seed(self.seed, rank, self._micro_batch_index()))

    # ---------------------------------------------------------------- training
    def train_denoiser(self) -> Callable[..., Tensor]:
        """The denoiser the training step calls: ``self.denoiser``, or its compiled form (created once, held
        in ``__dict__`` so that it is not a submodule and adds no ``_orig_mod.`` state-dict keys)."""
        if not self.compile:
            return self.denoiser
        if self.__dict__.get("_compiled") is None:
            self.__dict__["_compiled"] = compile_module(self.denoiser, self.compile_mode)
        return self.__dict__["_compiled"]

    def _batch_loss(self, denoiser: Callable[..., Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        images, labels = batch[0], batch[1]
        x = to_model_range(images)  # kept NCHW, so the noise drawn like it is the same with channels_last:
        # the first convolution's channels_last weight makes its output, and all that follows, NHWC
        y = one_hot(labels, self.label_dim) if self.label_dim > 0 else None
        return self.loss_fn(denoiser, x, y)

    def objective(self, per_sample: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        """The loss the optimizer minimises from the per-sample losses (B,): their mean."""
        return per_sample.mean()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        self._reseed()
        per_sample = self._batch_loss(self.train_denoiser(), batch)
        loss = self.objective(per_sample, batch)
        detached = per_sample.detach().double()
        self._loss_sum += torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0).sum()
        self._loss_count += torch.isfinite(detached).sum()
        self._step_nonfinite |= ~torch.isfinite(loss.detach())
        self._micro_in_step += 1
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.denoiser.parameters() if p.grad is not None]
        if not grads:
            return
        # EDM: replace NaN by 0 and +-Inf by +-1e5 so one bad batch cannot destroy the weights
        for g in grads:
            torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
        self._grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        beta = ema_beta(self.n_img, self.batch_total, self.ema_halflife_kimg, self.ema_rampup_ratio)
        self.ema.update(self.denoiser, beta)
        self.n_img += self.batch_total
        self._micro_in_step = 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._micro_in_step != 0:  # inside an accumulation round
            return
        # consecutive non-finite steps, counted on the device
        self._nonfinite_streak = torch.where(
            self._step_nonfinite, self._nonfinite_streak + 1, torch.zeros_like(self._nonfinite_streak)
        )
        self._step_nonfinite.zero_()
        step = self.global_step
        if step % self.log_every_n_steps == 0 or step == 1:
            self._log_interval(batch)

    def _log_interval(self, batch: Any) -> None:
        streak = int(self._nonfinite_streak.item())
        if streak >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"training loss was NaN/Inf for {streak} consecutive steps (n_img={self.n_img}); "
                "lower optimizer.lr, check the data range, or raise max_nonfinite_steps to keep going"
            )
        count = self._loss_count.clamp(min=1)
        metrics = {
            "n_img": float(self.n_img),
            "train/loss": float((self._loss_sum / count).item()),
            "train/grad_norm": float(self._grad_norm.item()),
            "lr": float(self.optimizers().param_groups[0]["lr"]),
        }
        if self.ema_loss_every_n_steps > 0 and self.global_step % self.ema_loss_every_n_steps == 0:
            with torch.no_grad():
                self._reseed()
                metrics["train/ema_loss"] = float(self._batch_loss(self.ema, batch).mean().item())
        self.last_loss = metrics["train/loss"]
        self._loss_sum.zero_()
        self._loss_count.zero_()
        # straight to the loggers: exactly one row per logging step, n_img on every row
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        extra = {"fused": True} if self.fused_adam and accepts_fused(self.optimizer_factory) else {}
        params = [p for p in self.denoiser.parameters() if p.requires_grad]  # all, but a frozen InvDiff base
        optimizer = self.optimizer_factory(params=params, **extra)
        optimizer.register_load_state_dict_post_hook(match_state_layout)
        schedule, batch_total, total_img = self.lr_schedule, self.batch_total, self.total_img
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda step: schedule(step * batch_total, total_img)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        for logger in self.loggers:  # wandb: plot every metric against n_img
            define_metric = getattr(getattr(logger, "experiment", None), "define_metric", None)
            if type(logger).__name__ == "WandbLogger" and callable(define_metric):
                define_metric("n_img")
                define_metric("*", step_metric="n_img")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["n_img"] = int(self.n_img)
        checkpoint["biasamp_format"] = FORMAT_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.n_img = int(checkpoint["n_img"])

    # ---------------------------------------------------------------- diagnostics
    def fingerprint(self) -> dict[str, Any]:
        """Per-rank facts for the run summary: weight checksums and an RNG-state digest."""
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten() for p in self.denoiser.parameters()])
            ema = torch.cat([p.detach().double().flatten() for p in self.ema.parameters()])
        rng = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        return {
            "weights_sum": float(flat.sum()),
            "weights_abs_sum": float(flat.abs().sum()),
            "ema_sum": float(ema.sum()),
            "rng_digest": rng,
            "last_loss": self.last_loss if self.last_loss is not None else math.nan,
        }


class InvDiffModule(DiffusionModule):
    """DiffusionModule whose objective is InvDiff's group V-REx over the batch's group weights (the fourth batch
    element, training.invdiff): mean_k L_k + lam Var_k L_k. The logged train/loss stays the per-sample mean."""

    def __init__(self, *args: Any, lam: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lam = float(lam)

    def objective(self, per_sample: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        from biasamp.mitigation.invdiff import vrex_loss

        if len(batch) < 4:
            raise RuntimeError("InvDiff fine-tuning needs batches with group weights (images, labels, biases, g)")
        return vrex_loss(per_sample, batch[3].to(per_sample.dtype), self.lam)
