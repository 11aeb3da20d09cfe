"""Samplers: plain functions of (denoiser, noise, sigmas) that integrate from sigmas[0] down to sigmas[-1].

A denoiser is ``D(x, sigma) -> Tensor``: x float32 (B, C, H, W), sigma float32 (B,), returning the estimate of
the clean image E[x_0 | x] as float32 (B, C, H, W); labels and guidance are closed over by the caller
(``guidance.guided_denoiser``). ``noise`` is an ``IndexNoise``: draw 0 is the initial noise, draw ``i + 1``
the noise added at step i, so every sample's result depends on its own index only.

The state x is float32; step coefficients are computed in float64 (Python floats) from the float64 schedule.
The probability-flow ODE in EDM's parametrisation is dx/dsigma = (x - D(x; sigma)) / sigma.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from biasamp.errors import UsageError
from biasamp.sampling.noise import IndexNoise
from biasamp.sampling.schedules import edm_sigmas

Denoiser = Callable[[Tensor, Tensor], Tensor]

_SQRT2_M1 = math.sqrt(2.0) - 1.0


def _sigma_batch(value: float, x: Tensor) -> Tensor:
    """The noise level as the (B,) float32 tensor a denoiser takes."""
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


def _initial(noise: IndexNoise, sigmas: Tensor) -> tuple[Tensor, list[float]]:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of at least 2 values, got shape {tuple(sigmas.shape)}")
    steps = [float(s) for s in sigmas.tolist()]
    return noise(0) * steps[0], steps  # x_0 = n t_0


@torch.no_grad()
def sample_edm(denoiser: Denoiser, noise: IndexNoise, sigmas: Tensor, solver: str = "heun",
               s_churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) with a Heun or Euler step.

    sigmas: float64 (M + 1,) decreasing schedule, usually ending at 0; gamma_i = min(S_churn / M, sqrt(2) - 1)
    with M the steps this schedule takes, so after n_skipped_steps M = N - n, the seed's: gamma = S_churn / (N - n).
    Returns x float32 (B, *noise.shape). With s_churn = 0 no noise is drawn after the initial one (the
    deterministic ODE sampler).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver={solver!r} is not allowed: must be heun or euler")
    x, t = _initial(noise, sigmas)
    n_churn = len(t) - 1  # the steps actually taken: N - n after n_skipped_steps, as the seed's S_churn / (N - n)
    for i in range(len(t) - 1):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(s_churn / n_churn, _SQRT2_M1) if s_churn > 0 and s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur * (1.0 + gamma)  # t̂_i = t_i (1 + γ_i)
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * noise(i + 1)  # x̂ = x + sqrt(t̂² − t²) S_noise ε
        d = (x - denoiser(x, _sigma_batch(t_hat, x))) / t_hat  # d_i = (x̂ − D(x̂; t̂)) / t̂
        x_next = x + (t_next - t_hat) * d  # Euler: x' = x̂ + (t_{i+1} − t̂) d_i
        if solver == "heun" and t_next != 0:
            d_next = (x_next - denoiser(x_next, _sigma_batch(t_next, x))) / t_next  # d' = (x' − D(x'; t_{i+1}))/t_{i+1}
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)  # Heun: x̂ + (t_{i+1} − t̂)(d + d')/2
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp(denoiser: Denoiser, noise: IndexNoise, sigmas: Tensor, order: int = 2) -> Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022), order 2 (2M) or 3 (3M), deterministic, data prediction.

    In EDM's parametrisation (alpha = 1) with lambda = -log sigma and h = lambda_{i+1} - lambda_i, the exact step is
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + integral over [lambda_i, lambda_{i+1}] of e^(lambda - lambda_{i+1}) D dlambda;
    the solvers expand D in lambda around lambda_i with differences of the previous steps' denoised values.

    3M is the reference DPM-Solver++(3M): the update of DPM-Solver's ``multistep_dpm_solver_third_update``
    (algorithm "dpmsolver++"), of diffusers' ``DPMSolverMultistepScheduler`` third-order update and of
    k-diffusion's ``sample_dpmpp_3m_sde`` at eta = 0. With h_0 = lambda_i - lambda_{i-1},
    h_1 = lambda_{i-1} - lambda_{i-2}, r0 = h_0/h, r1 = h_1/h, D1_0 = (D_i - D_{i-1})/r0,
    D1_1 = (D_{i-1} - D_{i-2})/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1),
    phi1 = expm1(-h), phi2 = phi1/h + 1, phi3 = phi2/h - 1/2:
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i - phi1 D_i + phi2 D1 - phi3 D2. Its last term is half the Taylor term
    of the integral, so it is not exact for D quadratic in lambda and its global error falls as h^2 (with a
    smaller constant than 2M's); biasamp keeps the references' coefficient.

    Warm-up as DPM-Solver and diffusers: step 0 is first order (DDIM), step 1 (and every step of 2M) the 2M
    midpoint formula D~ = (1 + 1/(2r)) D_i - D_{i-1}/(2r), r = h_0/h. k-diffusion's 3M differs at step 1: it adds
    phi2 (D_i - D_{i-1})/r instead (its 2M sampler uses the midpoint formula). No "lower_order_final" is
    applied (DPM-Solver with fewer than 10 steps and diffusers with fewer than 15 lower the order of the last
    steps by default); a step to sigma = 0 returns the denoised value (the limit h -> inf), as all three do
    (DPM-Solver with ``denoise_to_zero``). sigmas: float64 (N + 1,). Returns x float32 (B, *noise.shape).
    """
    if order not in (2, 3):
        raise ValueError(f"order={order!r} is not allowed: must be 2 or 3")
    x, s = _initial(noise, sigmas)
    lambdas: list[float] = []  # lambda_j of the previous steps, most recent last
    denoised_hist: list[Tensor] = []  # D(x_j; sigma_j) of the previous steps
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x))
        if sigma_next == 0:
            x = denoised  # h -> inf: x_{i+1} = D(x_i; sigma_i)
            continue
        lam, lam_next = -math.log(sigma), -math.log(sigma_next)
        h = lam_next - lam
        c0 = -math.expm1(-h)  # ∫ e^(λ−λ') dλ over the step = 1 − e^(−h) = −φ1
        k = min(order, i + 1)
        if k == 1:
            drift = c0 * denoised  # DPM-Solver++(1) (= DDIM): x' = (σ'/σ) x + (1 − e^(−h)) D
        elif k == 2:
            h_prev = lam - lambdas[-1]
            r = h_prev / h
            # DPM-Solver++(2M), Lu et al. Alg. 2: D̃ = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}, r = h_{i−1}/h_i
            # (DPM-Solver's and diffusers' midpoint form −φ1 D_i − φ1 (D_i − D_{i−1})/(2r); also 3M's step 1)
            drift = c0 * ((1.0 + 0.5 / r) * denoised - (0.5 / r) * denoised_hist[-1])
        else:
            h1, h2 = lam - lambdas[-1], lambdas[-1] - lambdas[-2]
            c1 = h - c0  # ∫ e^(λ−λ') (λ − λ_i) dλ = h − 1 + e^(−h) = h φ2
            c2 = 0.5 * h * h - c1  # ∫ e^(λ−λ') (λ − λ_i)²/2 dλ = h²/2 − h + 1 − e^(−h) = −h² φ3
            slope_01 = (denoised - denoised_hist[-1]) / h1  # divided differences of D over λ: D1_0 / h
            slope_12 = (denoised_hist[-1] - denoised_hist[-2]) / h2  # D1_1 / h
            curv = (slope_01 - slope_12) / (h1 + h2)  # D[λ_i, λ_{i−1}, λ_{i−2}] = D2 / h²
            d1 = slope_01 + h1 * curv  # D'(λ_i) from the quadratic through the last three points = D1 / h
            # reference DPM-Solver++(3M): x' = (σ'/σ) x − φ1 D + φ2 D1 − φ3 D2 = (σ'/σ) x + c0 D + c1 d1 + c2 curv
            # (c2 curv is half the Taylor term c2 D'' = 2 c2 curv; DPM-Solver, diffusers and k-diffusion use c2 curv)
            drift = c0 * denoised + c1 * d1 + c2 * curv
        x = (sigma_next / sigma) * x + drift  # exponential integrator: x' = (σ'/σ) x + ∫ e^(λ−λ') D dλ
        lambdas.append(lam)
        denoised_hist.append(denoised)
        if len(denoised_hist) > 2:
            lambdas.pop(0)
            denoised_hist.pop(0)
    return x


def _ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral / DDIM(eta) step from sigma to sigma_next."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    # DDIM's σ_t(η) in VE units: σ_up = min(σ', η sqrt(σ'² (σ² − σ'²) / σ²)), σ_down = sqrt(σ'² − σ_up²)
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return sigma_down, sigma_up


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, noise: IndexNoise, sigmas: Tensor, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021) in EDM's VE sigma parametrisation.

    Each step: eps_hat = (x - D)/sigma, x' = D + sigma_down eps_hat + sigma_up eps with eps = noise(i + 1);
    eta = 0 is deterministic (sigma_down = sigma_next: the Euler / DPM-Solver++(1) step, computed with the same
    arithmetic as ``sample_edm(solver="euler")``, so bit-identical to it), eta = 1 is ancestral sampling. In VE
    units DDIM(eta) is the same update as ``sample_euler_ancestral(eta, s_noise=1)``.
    sigmas: float64 (N + 1,). Returns x float32 (B, *noise.shape).
    """
    # DDIM eq. 12 in VE units: x' = D + σ_down ε̂ + σ_up ε with ε̂ = (x − D)/σ, i.e. x + (σ_down − σ) ε̂ + σ_up ε:
    # exactly the ancestral Euler update with S_noise = 1, so one implementation serves both.
    return sample_euler_ancestral(denoiser, noise, sigmas, eta=eta, s_noise=1.0)


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, noise: IndexNoise, sigmas: Tensor, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up (eps = noise(i + 1)).

    sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2). sigmas: float64 (N + 1,). Returns x float32 (B, *noise.shape).
    """
    if eta < 0:
        raise ValueError(f"eta={eta!r} is not allowed: must be >= 0")
    x, s = _initial(noise, sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
        d = (x - denoiser(x, _sigma_batch(sigma, x))) / sigma  # ODE derivative d = (x − D(x; σ))/σ
        x = x + (sigma_down - sigma) * d  # Euler step to σ_down
        if sigma_up > 0:
            x = x + sigma_up * s_noise * noise(i + 1)  # add noise back up to σ': x += σ_up S_noise ε
    return x


# ---------------------------------------------------------------------------------------------------------------
# Configs: one family per conf/sampler/<name>.yaml

SCHEDULE_DEFAULTS: dict[str, Any] = {"num_steps": 18, "sigma_min": None, "sigma_max": None, "rho": 7.0}

SAMPLER_DEFAULTS: dict[str, dict[str, Any]] = {
    "edm": {**SCHEDULE_DEFAULTS, "solver": "heun", "s_churn": 0.0, "s_min": 0.0, "s_max": math.inf,
            "s_noise": 1.0, "n_skipped_steps": 0},
    "dpmpp": {**SCHEDULE_DEFAULTS, "num_steps": 20, "order": 2},
    "ddim": {**SCHEDULE_DEFAULTS, "num_steps": 50, "eta": 0.0},
    "euler_ancestral": {**SCHEDULE_DEFAULTS, "num_steps": 50, "eta": 1.0, "s_noise": 1.0},
}
"""Every parameter of each sampler family with its default (``name`` aside); the yaml files mirror these."""


def _bad(key: str, value: Any, allowed: str) -> UsageError:
    return UsageError(f"sampler.{key}={value!r} is not allowed: {allowed}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_sampler_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as a plain dict with every parameter of its family (defaults filled in). Validates first."""
    check_sampler_config(cfg)
    return {"name": cfg["name"], **SAMPLER_DEFAULTS[cfg["name"]], **{k: cfg[k] for k in cfg if k != "name"}}


def check_sampler_config(cfg: Mapping[str, Any], *, model_sigma_min: float | None = None,
                         model_sigma_max: float | None = None) -> None:
    """Raise UsageError (one line naming the key, the value and what is allowed) for a config that cannot work.

    Missing keys take the family's defaults (SAMPLER_DEFAULTS). model_sigma_min / model_sigma_max, when given,
    stand in for null sigma_min / sigma_max so the resolved range is checked too.
    """
    if not isinstance(cfg, Mapping):
        raise UsageError(f"sampler={cfg!r} is not allowed: a mapping (a conf/sampler/*.yaml file)")
    name = cfg.get("name")
    if name not in SAMPLER_DEFAULTS:
        raise _bad("name", name, f"must be one of {', '.join(SAMPLER_DEFAULTS)}")
    defaults = SAMPLER_DEFAULTS[name]
    for key in cfg:
        if key != "name" and key not in defaults:
            raise UsageError(f"sampler.{key}={cfg[key]!r} is not allowed: {key!r} is not a parameter of the "
                             f"{name} sampler (its parameters: {', '.join(defaults)})")
    c = {**defaults, **{k: cfg[k] for k in cfg if k != "name"}}

    if not _is_int(c["num_steps"]) or c["num_steps"] < 1:
        raise _bad("num_steps", c["num_steps"], "must be an integer >= 1")
    if not _is_real(c["rho"]) or not 0 < c["rho"] < math.inf:
        raise _bad("rho", c["rho"], "must be a finite number > 0")
    for key, model_value in (("sigma_min", model_sigma_min), ("sigma_max", model_sigma_max)):
        value = c[key]
        if value is not None and (not _is_real(value) or not 0 < value < math.inf):
            raise _bad(key, value, "must be null (the model's value) or a finite number > 0")
        if value is None and model_value is not None:
            c[key] = model_value
    if c["sigma_min"] is not None and c["sigma_max"] is not None and not c["sigma_min"] < c["sigma_max"]:
        raise _bad("sigma_min", cfg.get("sigma_min"),
                   f"must be below sigma_max (resolved sigma_min={c['sigma_min']!r} >= sigma_max={c['sigma_max']!r})")

    if name == "edm":
        if c["solver"] not in ("heun", "euler"):
            raise _bad("solver", c["solver"], "must be heun or euler")
        if not _is_real(c["s_churn"]) or not 0 <= c["s_churn"] < math.inf:
            raise _bad("s_churn", c["s_churn"], "must be a finite number >= 0")
        if not _is_real(c["s_min"]) or c["s_min"] < 0:
            raise _bad("s_min", c["s_min"], "must be a number >= 0")
        if not _is_real(c["s_max"]) or c["s_max"] < c["s_min"]:
            raise _bad("s_max", c["s_max"], f"must be a number >= s_min ({c['s_min']!r}); .inf for no upper bound")
        n_skip = c["n_skipped_steps"]
        if not _is_int(n_skip) or not 0 <= n_skip < c["num_steps"]:
            raise _bad("n_skipped_steps", n_skip, f"must be an integer in [0, num_steps) = [0, {c['num_steps']})")
    if name == "dpmpp" and (not _is_int(c["order"]) or c["order"] not in (2, 3)):
        raise _bad("order", c["order"], "must be 2 or 3")
    if name in ("ddim", "euler_ancestral") and (not _is_real(c["eta"]) or not 0 <= c["eta"] < math.inf):
        raise _bad("eta", c["eta"], "must be a finite number >= 0")
    if name in ("edm", "euler_ancestral") and (not _is_real(c["s_noise"]) or not 0 < c["s_noise"] < math.inf):
        raise _bad("s_noise", c["s_noise"], "must be a finite number > 0")


def sampler_sigmas(sampler_cfg: Mapping[str, Any], sigma_min: float, sigma_max: float) -> Tensor:
    """The float64 schedule a config implies; null sigma_min / sigma_max take the given model values."""
    check_sampler_config(sampler_cfg, model_sigma_min=sigma_min, model_sigma_max=sigma_max)
    c = resolve_sampler_config(sampler_cfg)
    lo = float(sigma_min if c["sigma_min"] is None else c["sigma_min"])
    hi = float(sigma_max if c["sigma_max"] is None else c["sigma_max"])
    return edm_sigmas(c["num_steps"], lo, hi, float(c["rho"]), c.get("n_skipped_steps", 0))


def nfe_per_sample(sampler_cfg: Mapping[str, Any]) -> int:
    """Denoiser evaluations per sample the config implies: Heun 2N - 1 (N = steps actually taken, after
    n_skipped_steps), every other sampler N. Guidance multiplies network evaluations on top of this."""
    c = resolve_sampler_config(sampler_cfg)
    if c["name"] == "edm":
        steps = c["num_steps"] - c["n_skipped_steps"]
        return 2 * steps - 1 if c["solver"] == "heun" else steps
    return int(c["num_steps"])


def evaluated_sigmas(sampler_cfg: Mapping[str, Any], sigma_min: float, sigma_max: float) -> list[float]:
    """Every noise level at which the configured sampler evaluates the denoiser, decreasing, without repeats.

    EDM: t̂_i = t_i (1 + γ_i) of every step (γ_i as ``sample_edm``: churn inside [s_min, s_max] only) and, for
    Heun, the second evaluation's t_{i+1} of every step that does not end at 0; dpmpp, ddim, euler_ancestral:
    the schedule's sigmas but the final 0. Values are the float64 numbers the samplers compute (the denoiser sees
    them rounded to float32). An h-space head is trained for each (``biasamp.hspace``)."""
    sigmas = [float(s) for s in sampler_sigmas(sampler_cfg, sigma_min, sigma_max).tolist()]
    c = resolve_sampler_config(sampler_cfg)
    found: list[float] = []
    if c["name"] != "edm":
        found = sigmas[:-1]
    else:
        n_churn = len(sigmas) - 1
        s_churn, s_min, s_max = float(c["s_churn"]), float(c["s_min"]), float(c["s_max"])
        for i in range(len(sigmas) - 1):
            t_cur, t_next = sigmas[i], sigmas[i + 1]
            gamma = min(s_churn / n_churn, _SQRT2_M1) if s_churn > 0 and s_min <= t_cur <= s_max else 0.0
            found.append(t_cur * (1.0 + gamma))
            if c["solver"] == "heun" and t_next != 0:
                found.append(t_next)
    return sorted(set(found), reverse=True)


def sample(denoiser: Denoiser, noise: IndexNoise, sampler_cfg: Mapping[str, Any], sigma_min: float,
           sigma_max: float) -> Tensor:
    """Run the sampler a config names (edm | dpmpp | ddim | euler_ancestral) and return x float32 (B, *shape).

    sigma_min / sigma_max: the model's range, used where the config leaves them null.
    """
    sigmas = sampler_sigmas(sampler_cfg, sigma_min, sigma_max)
    c = resolve_sampler_config(sampler_cfg)
    name = c["name"]
    if name == "edm":
        return sample_edm(denoiser, noise, sigmas, solver=c["solver"], s_churn=float(c["s_churn"]),
                          s_min=float(c["s_min"]), s_max=float(c["s_max"]), s_noise=float(c["s_noise"]))
    if name == "dpmpp":
        return sample_dpmpp(denoiser, noise, sigmas, order=int(c["order"]))
    if name == "ddim":
        return sample_ddim(denoiser, noise, sigmas, eta=float(c["eta"]))
    return sample_euler_ancestral(denoiser, noise, sigmas, eta=float(c["eta"]), s_noise=float(c["s_noise"]))
