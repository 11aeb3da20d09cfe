"""Tests for biasamp.sampling: index noise, sigma schedules, samplers against an analytic denoiser, guidance,
sampler configs.

The analytic denoiser is the exact D(x; sigma) = E[x_0 | x_0 + sigma n = x] of a mixture of isotropic Gaussians:
posterior weights times (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch import nn

from biasamp.errors import UsageError
from biasamp.models import EDMPrecond, one_hot
from biasamp.sampling import (
    SAMPLER_DEFAULTS,
    IndexNoise,
    apply_guidance,
    check_sampler_config,
    edm_sigmas,
    guidance_from_scale,
    guided_denoiser,
    index_noise,
    karras_sigmas,
    nfe_per_sample,
    sample,
    sample_ddim,
    sample_dpmpp,
    sample_edm,
    sample_euler_ancestral,
    sampler_sigmas,
)

SAMPLER_CONF = Path(__file__).parents[1] / "conf" / "sampler"
SHAPE = (2, 1, 1)  # one sample: a 2-D point as a (C, H, W) image
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0

# a 3-mode mixture in 2-D: weights, means, stds
MIX_W = [0.5, 0.3, 0.2]
MIX_MU = [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]
MIX_SD = [0.3, 0.2, 0.4]


class MixtureDenoiser:
    """Exact D(x; sigma) for a mixture of isotropic Gaussians; counts calls and denoised rows."""

    def __init__(self, weights, means, stds) -> None:
        self.log_w = torch.log(torch.tensor(weights, dtype=torch.float64))
        self.mu = torch.tensor(means, dtype=torch.float64)  # (K, D)
        self.var0 = torch.tensor(stds, dtype=torch.float64) ** 2  # (K,)
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and sigma.shape == (x.shape[0],)
        self.calls += 1
        self.rows += x.shape[0]
        xf = x.reshape(x.shape[0], -1).to(torch.float64)  # (B, D)
        s2 = sigma.to(torch.float64)[:, None] ** 2  # (B, 1)
        var = self.var0[None, :] + s2  # (B, K): marginal variance of each component at this sigma
        diff = xf[:, None, :] - self.mu[None]  # (B, K, D)
        log_post = self.log_w - 0.5 * xf.shape[1] * torch.log(var) - (diff**2).sum(-1) / (2 * var)
        post = torch.softmax(log_post, dim=1)
        # E[x0 | x, k] = (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2) = x - sigma^2 (x - mu_k) / var_k
        mean_k = xf[:, None, :] - (s2 / var)[:, :, None] * diff
        return (post[:, :, None] * mean_k).sum(1).reshape(x.shape).to(torch.float32)


def mixture() -> MixtureDenoiser:
    return MixtureDenoiser(MIX_W, MIX_MU, MIX_SD)


def mixture_moments() -> tuple[np.ndarray, np.ndarray]:
    w, mu, sd = np.array(MIX_W), np.array(MIX_MU), np.array(MIX_SD)
    mean = (w[:, None] * mu).sum(0)
    var = (w[:, None] * (sd[:, None] ** 2 + mu**2)).sum(0) - mean**2
    return mean, var


def nearest_mode_fractions(x: np.ndarray) -> np.ndarray:
    d2 = ((x[:, None, :] - np.array(MIX_MU)[None]) ** 2).sum(-1)
    return np.bincount(d2.argmin(1), minlength=len(MIX_W)) / len(x)


def true_mode_fractions() -> np.ndarray:
    """Nearest-mode fractions of data drawn from the mixture itself (Monte Carlo, 10^6 draws)."""
    rng = np.random.default_rng(0)
    k = rng.choice(len(MIX_W), size=10**6, p=MIX_W)
    x = np.array(MIX_MU)[k] + np.array(MIX_SD)[k, None] * rng.standard_normal((10**6, 2))
    return nearest_mode_fractions(x)


def assert_matches_mixture(x: torch.Tensor, z_max: float = 5.0) -> None:
    """Mean and variance per dimension, and mode fractions, within z_max standard errors of the truth."""
    x = x.reshape(x.shape[0], -1).double().numpy()
    n = len(x)
    mean, var = mixture_moments()
    se_mean = np.sqrt(var / n)
    se_var = ((x - x.mean(0)) ** 2).std(0) / np.sqrt(n)
    frac, frac_true = nearest_mode_fractions(x), true_mode_fractions()
    se_frac = np.sqrt(frac_true * (1 - frac_true) / n)
    assert np.all(np.abs(x.mean(0) - mean) < z_max * se_mean), (x.mean(0), mean)
    assert np.all(np.abs(x.var(0) - var) < z_max * se_var), (x.var(0), var)
    assert np.all(np.abs(frac - frac_true) < z_max * se_frac), (frac, frac_true)


class RecordingNoise(IndexNoise):
    """IndexNoise that records which draws a sampler asks for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws: list[int] = []

    def __call__(self, draw: int) -> torch.Tensor:
        self.draws.append(draw)
        return super().__call__(draw)


class RecordingDenoiser:
    """Wraps a denoiser (default D = 0) and records every (x, sigma) it is called with."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.inputs.append((x.clone(), sigma.clone()))
        return torch.zeros_like(x) if self.inner is None else self.inner(x, sigma)

    @property
    def sigmas(self) -> list[float]:
        return [float(s[0]) for _, s in self.inputs]


# ------------------------------------------------------------------------------------------------ noise


def test_index_noise_is_batch_invariant():
    shape = (3, 4, 5)  # 60 elements
    in_small = index_noise(7, torch.arange(0, 7), 0, shape)[5]
    in_large = index_noise(7, torch.arange(3, 71), 0, shape)[2]
    alone = index_noise(7, torch.tensor([5]), 0, shape)[0]
    shuffled = index_noise(7, torch.tensor([40, 5, 2]), 0, shape)[1]
    assert torch.equal(in_small, in_large) and torch.equal(in_small, alone) and torch.equal(in_small, shuffled)
    # the same through IndexNoise and its subsets, at a later draw too
    noise = IndexNoise(7, torch.arange(10, 20), shape)
    assert torch.equal(noise(3)[4], index_noise(7, torch.tensor([14]), 3, shape)[0])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 8]] = True
    assert torch.equal(noise.subset(mask)(3), noise(3)[mask])
    assert torch.equal(noise.subset([8, 1])(2), noise(2)[[8, 1]])
    assert noise.subset(slice(2, 5)).sample_idx.tolist() == [12, 13, 14]


def test_index_noise_shape_dtype_and_odd_sizes():
    z = index_noise(0, torch.arange(4), 1, (3, 3, 3))  # 27 elements: the last Box-Muller pair half used
    assert z.shape == (4, 3, 3, 3) and z.dtype == torch.float32 and torch.isfinite(z).all()
    flat = index_noise(0, torch.arange(4), 1, (27,))
    assert torch.equal(z.reshape(4, -1), flat)  # element j depends on the flat position only
    assert torch.equal(index_noise(0, torch.arange(4), 1, (28,))[:, :27], flat)
    assert IndexNoise(0, torch.arange(4), (1,))(0).shape == (4, 1)
    with pytest.raises(ValueError, match="sample_idx"):
        index_noise(0, torch.tensor([1.0]), 0, (2,))
    with pytest.raises(ValueError, match="sample_idx"):
        index_noise(0, torch.tensor([3, -1]), 0, (2,))


def test_index_noise_differs_by_seed_draw_index():
    idx = torch.arange(100)
    base = index_noise(1, idx, 0, (50,))
    for other in (index_noise(2, idx, 0, (50,)), index_noise(1, idx, 1, (50,)), index_noise(1, idx + 100, 0, (50,)),
                  index_noise(1 + 2**32, idx, 0, (50,)), index_noise(1, idx + 2**32, 0, (50,))):
        assert (other != base).float().mean() > 0.99
    # no two samples or elements repeat a value
    assert torch.unique(base).numel() > 0.999 * base.numel()


def test_index_noise_statistics():
    z = index_noise(123, torch.arange(1000), 0, (1000,)).double()  # 10^6 values
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(flat.numpy())) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(flat.numpy())) < 5 * math.sqrt(24 / n)
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])

    z1 = index_noise(123, torch.arange(1000), 1, (1000,)).double()
    assert abs(corr(z, z1)) < 0.01  # between draws
    assert abs(corr(z[:, 0::2], z[:, 1::2])) < 0.01  # adjacent elements (a Box-Muller pair)
    assert abs(corr(z[:, 1:-1:2], z[:, 2::2])) < 0.01  # adjacent elements across pairs
    assert abs(corr(z[:-1], z[1:])) < 0.01  # adjacent sample indices
    assert abs(corr(z, index_noise(124, torch.arange(1000), 0, (1000,)).double())) < 0.01  # adjacent seeds
    assert abs(corr(z**2, z1**2)) < 0.01  # and no dependence through the magnitude


@pytest.mark.gpu
def test_index_noise_same_on_cuda():
    idx = torch.arange(50, 90)
    cpu = index_noise(9, idx, 4, (3, 8, 8))
    gpu = index_noise(9, idx.cuda(), 4, (3, 8, 8))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ schedules


def test_karras_sigmas_hand_values():
    assert karras_sigmas(1, 0.002, 80.0).tolist() == [80.0, 0.0]
    assert karras_sigmas(2, 0.002, 80.0).tolist() == [80.0, 0.002, 0.0]
    mid = ((80.0 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7  # i = 1 of N = 3
    s3 = karras_sigmas(3, 0.002, 80.0)
    assert s3.dtype == torch.float64 and s3.shape == (4,)
    assert s3[1].item() == pytest.approx(mid, rel=1e-12)
    assert karras_sigmas(5, 0.2, 1.0, rho=1.0).numpy() == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], abs=1e-12)
    s18 = karras_sigmas(18, 0.002, 80.0)
    assert s18.shape == (19,) and s18[0] == 80.0 and s18[17] == 0.002 and s18[18] == 0.0
    assert (s18[1:] < s18[:-1]).all()
    # EDM's 18-step schedule, t_1 by hand
    assert s18[1].item() == pytest.approx((80 ** (1 / 7) + (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17) ** 7, rel=1e-12)
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(0, 0.002, 80.0)


def test_edm_sigmas_skips_steps():
    full = karras_sigmas(6, 0.002, 80.0)
    assert torch.equal(edm_sigmas(6, 0.002, 80.0, 7.0, 0), full)
    assert torch.equal(edm_sigmas(6, 0.002, 80.0, 7.0, 2), full[[0, 3, 4, 5, 6]])
    assert torch.equal(edm_sigmas(6, 0.002, 80.0, 7.0, 5), full[[0, 6]])
    for bad in (6, -1):
        with pytest.raises(ValueError, match="n_skipped_steps"):
            edm_sigmas(6, 0.002, 80.0, 7.0, bad)


# ------------------------------------------------------------------------------------------------ samplers


def test_heun_reproduces_the_mixture():
    noise = IndexNoise(1, torch.arange(20_000), SHAPE)
    x = sample_edm(mixture(), noise, karras_sigmas(256, SIGMA_MIN, SIGMA_MAX))
    assert x.shape == (20_000, *SHAPE) and x.dtype == torch.float32
    assert_matches_mixture(x)


GAUSS_MU, GAUSS_SD = [0.3, -0.2], 0.5


def gaussian_ode_solution(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The exact probability-flow ODE map for N(mu, s^2 I): x(sigma) - mu scales with sqrt(s^2 + sigma^2)."""
    mu = torch.tensor(GAUSS_MU, dtype=torch.float64).reshape(1, 2, 1, 1)
    scale = math.sqrt(GAUSS_SD**2 + sigma_end**2) / math.sqrt(GAUSS_SD**2 + sigma_start**2)
    return mu + (x_start.double() - mu) * scale


def ode_errors(solver, steps: list[int]) -> list[float]:
    """Max error against the exact ODE map from sigma_max to sigma_min (the schedule without its final 0)."""
    gauss = MixtureDenoiser([1.0], [GAUSS_MU], [GAUSS_SD])
    noise = IndexNoise(0, torch.arange(2000), SHAPE)
    exact = gaussian_ode_solution(noise(0) * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)
    errors = []
    for n in steps:
        x = solver(gauss, noise, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)[:-1])
        errors.append((x.double() - exact).abs().max().item())
    return errors


def test_ode_solvers_converge_at_their_order():
    euler = ode_errors(lambda d, n, s: sample_edm(d, n, s, solver="euler"), [8, 32, 128])
    heun = ode_errors(lambda d, n, s: sample_edm(d, n, s, solver="heun"), [8, 32, 128])
    assert euler[0] > euler[1] > euler[2] and heun[0] > heun[1] > heun[2]
    for ratio in (euler[0] / euler[1], euler[1] / euler[2]):  # first order: 4x the steps, 1/4 the error
        assert 3.0 < ratio < 5.5
    assert 12.0 < heun[1] / heun[2] < 24.0  # second order: 4x the steps, 1/16 the error
    assert heun[2] < euler[2] / 10

    dpm2 = ode_errors(lambda d, n, s: sample_dpmpp(d, n, s, order=2), [32, 64, 128])
    dpm3 = ode_errors(lambda d, n, s: sample_dpmpp(d, n, s, order=3), [32, 64, 128])
    for ratio in (dpm2[0] / dpm2[1], dpm2[1] / dpm2[2]):  # second order: 2x the steps, 1/4 the error
        assert 3.0 < ratio < 6.0
    # the reference 3M (half the Taylor D'' term) is below 2M at every step count; its order is measured on a
    # smooth D in test_reference_dpmpp_3m_is_second_order_with_a_smaller_error_than_2m
    assert all(e3 < e2 / 3 for e3, e2 in zip(dpm3, dpm2, strict=True)), (dpm3, dpm2)


class LambdaPolynomialDenoiser:
    """D(x; sigma) = a + b lambda + c lambda^2 with lambda = -log sigma, whatever x (per-channel a, b, c)."""

    def __init__(self, a: float, b: float, c: float) -> None:
        self.coef = (a, b, c)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        a, b, c = self.coef
        lam = -torch.log(sigma.double()).reshape(-1, *([1] * (x.ndim - 1)))
        return (a + b * lam + c * lam**2).expand_as(x).to(torch.float32)

    def ode_solution(self, x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
        """dx/dlambda = D - x solved exactly: a quadratic particular solution plus the decaying homogeneous one."""
        a, b, c = self.coef

        def particular(u: float) -> float:
            return (a - b + 2 * c) + (b - 2 * c) * u + c * u * u

        lam0, lam1 = -math.log(sigma_start), -math.log(sigma_end)
        return particular(lam1) + (x_start.double() - particular(lam0)) * math.exp(lam0 - lam1)


def test_dpmpp_2m_steps_by_hand():
    denoiser = LambdaPolynomialDenoiser(0.3, -0.2, 0.05)
    noise = IndexNoise(0, torch.arange(3), SHAPE)
    sigmas = torch.tensor([4.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    d = [denoiser(noise(0), torch.full((3,), v)) for v in (4.0, 2.0, 0.5)]
    x0 = noise(0) * 4.0
    # step 0, first order: x1 = (s1/s0) x0 + (1 - s1/s0) D0
    x1 = 0.5 * x0 + 0.5 * d[0]
    # step 1, 2M: h0 = ln 2, h1 = ln 4, r = h0/h1 = 1/2: x2 = (s2/s1) x1 + (1 - s2/s1) ((1 + 1/(2r)) D1 - D0/(2r))
    x2 = 0.25 * x1 + 0.75 * (2.0 * d[1] - d[0])
    torch.testing.assert_close(sample_dpmpp(denoiser, noise, sigmas[:3], order=2), x2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sample_dpmpp(denoiser, noise, sigmas, order=2), d[2])  # to sigma 0: the denoised


def test_reference_dpmpp_3m_is_second_order_with_a_smaller_error_than_2m():
    # D quadratic in lambda: 3M's only error is the half of c2 D'' the reference formula leaves out (and the
    # warm-up), so halving h quarters the error; 2M errs more at every step count
    denoiser = LambdaPolynomialDenoiser(0.3, -0.2, 0.05)
    noise = IndexNoise(0, torch.arange(100), SHAPE)
    exact = denoiser.ode_solution(noise(0) * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)

    def error(n: int, order: int) -> float:
        x = sample_dpmpp(denoiser, noise, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)[:-1], order=order)
        return (x.double() - exact).abs().max().item()

    err_3m = [error(n, 3) for n in (16, 32, 64)]
    err_2m = [error(n, 2) for n in (16, 32, 64)]
    for ratio in (err_3m[0] / err_3m[1], err_3m[1] / err_3m[2]):
        assert 3.5 < ratio < 6.0, err_3m
    assert all(e3 < e2 / 4 for e3, e2 in zip(err_3m, err_2m, strict=True)), (err_3m, err_2m)


class AffineDenoiser:
    """D(x; sigma) = a(sigma) x + b(sigma), both nonlinear in sigma: a = s^2 / (s^2 + sigma^2) and
    b = sigma^2 mu / (s^2 + sigma^2) + 0.1 sin(log sigma) (a Gaussian's posterior mean plus a wiggle)."""

    S2, MU = 0.25, 0.3

    def coefficients(self, sigma: float) -> tuple[float, float]:
        a = self.S2 / (self.S2 + sigma**2)
        b = sigma**2 * self.MU / (self.S2 + sigma**2) + 0.1 * math.sin(math.log(sigma))
        return a, b

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.double().reshape(-1, *([1] * (x.ndim - 1)))
        a = self.S2 / (self.S2 + s**2)
        b = s**2 * self.MU / (self.S2 + s**2) + 0.1 * torch.sin(torch.log(s))
        return (a * x.double() + b).to(torch.float32)

    def exact(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        a, b = self.coefficients(sigma)
        return a * x + b


def dpm_solver_pp_3m_by_hand(denoiser: AffineDenoiser, x: torch.Tensor, sigmas: list[float],
                             d2_factor: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) as LuChengTHU/dpm-solver writes it (algorithm dpmsolver++, alpha = 1), in float64:
    step 0 first order, step 1 second order (midpoint), then third order; a step to sigma = 0 returns D.
    ``d2_factor`` scales the phi3 D2 term (2 gives the Taylor-exact variant the reference does not use)."""
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    model = []  # D at the previous sigmas
    for i in range(len(sigmas) - 1):
        model.append(denoiser.exact(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = model[-1]
            continue
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        if i == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - phi1 * model[-1]
        elif i == 1:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (model[-1] - model[-2]) / r0
            x = (sigmas[i + 1] / sigmas[i]) * x - phi1 * model[-1] - 0.5 * phi1 * d1_0
        else:
            h_0, h_1 = lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
            r0, r1 = h_0 / h, h_1 / h
            d1_0 = (model[-1] - model[-2]) / r0
            d1_1 = (model[-2] - model[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            x = (sigmas[i + 1] / sigmas[i]) * x - phi1 * model[-1] + phi2 * d1 - d2_factor * phi3 * d2
    return x


def test_dpmpp_3m_is_the_reference_dpm_solver_update():
    denoiser = AffineDenoiser()
    noise = IndexNoise(0, torch.arange(6), SHAPE)
    full = karras_sigmas(5, 0.02, 10.0)  # 5 steps: orders 1, 2, 3, 3, then the step to sigma = 0
    for sigmas in (full[:-1], full):
        s = sigmas.tolist()
        x0 = noise(0).double() * s[0]
        reference = dpm_solver_pp_3m_by_hand(denoiser, x0, s)
        torch.testing.assert_close(sample_dpmpp(denoiser, noise, sigmas, order=3).double(), reference,
                                   rtol=1e-5, atol=1e-5)
        # the Taylor-exact variant (twice the phi3 D2 term) differs measurably on this grid
        doubled = dpm_solver_pp_3m_by_hand(denoiser, x0, s, d2_factor=2.0)
        assert (doubled - reference).abs().max().item() > 1e-3
    # 2M on the same grid is the hand loop's first two steps followed by midpoint steps: its step 2 differs from 3M
    assert not torch.allclose(sample_dpmpp(denoiser, noise, full[:4], order=2),
                              sample_dpmpp(denoiser, noise, full[:4], order=3), rtol=1e-5, atol=1e-5)


def test_deterministic_ode_maps_noise_to_data():
    gauss = MixtureDenoiser([1.0], [GAUSS_MU], [GAUSS_SD])
    noise = IndexNoise(3, torch.arange(2000), SHAPE)
    exact = gaussian_ode_solution(noise(0) * SIGMA_MAX, SIGMA_MAX, 0.0)
    errors = [(sample_edm(gauss, noise, karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)).double() - exact).abs().max().item()
              for n in (64, 256)]
    # second-order discretisation error, plus the last Euler step from sigma_min to 0 (relative 8e-6)
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 10
    x = sample_edm(gauss, noise, karras_sigmas(256, SIGMA_MIN, SIGMA_MAX))
    std = x.reshape(-1, 2).double().std(0)
    assert torch.all((std - GAUSS_SD).abs() < 5 * GAUSS_SD / math.sqrt(2 * 2000)), std


def test_dpmpp_beats_euler_at_the_same_nfe():
    noise = IndexNoise(2, torch.arange(4000), SHAPE)
    reference = sample_edm(mixture(), noise, karras_sigmas(512, SIGMA_MIN, SIGMA_MAX))
    sigmas = karras_sigmas(20, SIGMA_MIN, SIGMA_MAX)

    def rms(x: torch.Tensor) -> float:
        return (x - reference).pow(2).mean().sqrt().item()

    euler = rms(sample_edm(mixture(), noise, sigmas, solver="euler"))
    dpm2 = rms(sample_dpmpp(mixture(), noise, sigmas, order=2))
    dpm3 = rms(sample_dpmpp(mixture(), noise, sigmas, order=3))
    assert dpm2 < 0.6 * euler and dpm3 < 0.6 * euler, (euler, dpm2, dpm3)


def test_ddim_eta0_is_euler_and_ddim_eta1_is_ancestral():
    noise = IndexNoise(4, torch.arange(500), SHAPE)
    sigmas = karras_sigmas(16, SIGMA_MIN, SIGMA_MAX)
    euler = sample_edm(mixture(), noise, sigmas, solver="euler")
    assert torch.equal(sample_ddim(mixture(), noise, sigmas, eta=0.0), euler)
    assert torch.equal(sample_euler_ancestral(mixture(), noise, sigmas, eta=0.0), euler)
    ddim1 = sample_ddim(mixture(), noise, sigmas, eta=1.0)
    assert torch.equal(ddim1, sample_euler_ancestral(mixture(), noise, sigmas, eta=1.0))
    assert (ddim1 - euler).abs().max() > 0.1  # eta = 1 does add noise


@pytest.mark.parametrize("name, run", [
    ("euler_ancestral", lambda d, n, s: sample_euler_ancestral(d, n, s, eta=1.0)),
    ("ddim_eta1", lambda d, n, s: sample_ddim(d, n, s, eta=1.0)),
    ("edm_churn", lambda d, n, s: sample_edm(d, n, s, s_churn=40.0, s_min=0.05, s_max=50.0)),
])
def test_stochastic_samplers_have_the_right_marginal(name, run):
    noise = IndexNoise(5, torch.arange(10_000), SHAPE)
    x = run(mixture(), noise, karras_sigmas(256, SIGMA_MIN, SIGMA_MAX))
    assert_matches_mixture(x)


def test_stochastic_samplers_use_fresh_noise_per_step():
    """With D = 0 the ancestral step is x' = x sigma_down / sigma + s_noise sigma_up eps_{i+1}: check every state."""
    noise = RecordingNoise(0, torch.arange(8), SHAPE)
    recorder = RecordingDenoiser()
    sigmas = karras_sigmas(5, SIGMA_MIN, SIGMA_MAX)
    sample_euler_ancestral(recorder, noise, sigmas, eta=0.5, s_noise=1.3)
    assert noise.draws == [0, 1, 2, 3, 4]  # the last step (to sigma 0) draws nothing
    assert recorder.sigmas == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)
    expected = noise(0) * sigmas[0].item()
    s = sigmas.tolist()
    for i in range(4):
        torch.testing.assert_close(recorder.inputs[i][0], expected, rtol=1e-5, atol=1e-5)
        up = min(s[i + 1], 0.5 * math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2))
        down = math.sqrt(s[i + 1] ** 2 - up**2)
        assert up > 0.1 * s[i + 1] and down > 0.1 * s[i + 1]
        expected = expected * (down / s[i]) + up * 1.3 * noise(i + 1)
    torch.testing.assert_close(recorder.inputs[4][0], expected, rtol=1e-5, atol=1e-5)


def test_churn_gamma_window_and_noise():
    n_steps, s_min, s_max = 10, 0.1, 10.0
    sigmas = karras_sigmas(n_steps, SIGMA_MIN, SIGMA_MAX)
    t = sigmas.tolist()
    in_window = [i for i in range(n_steps) if s_min <= t[i] <= s_max]
    assert 0 < len(in_window) < n_steps
    for s_churn, gamma in ((2.0, 0.2), (50.0, math.sqrt(2) - 1)):  # 50 / 10 = 5 clamps to sqrt(2) - 1
        recorder = RecordingDenoiser()
        noise = RecordingNoise(1, torch.arange(6), SHAPE)
        x_end = sample_edm(recorder, noise, sigmas, solver="euler", s_churn=s_churn, s_min=s_min, s_max=s_max)
        t_hat = [t[i] * (1 + gamma) if i in in_window else t[i] for i in range(n_steps)]
        assert recorder.sigmas == pytest.approx(t_hat, rel=1e-6)
        assert noise.draws == [0] + [i + 1 for i in in_window]
        # x̂_i = x_i + sqrt(t̂² − t²) ε_{i+1}; with D = 0 the Euler step is x_{i+1} = x̂_i t_{i+1} / t̂_i
        x = noise(0) * t[0]
        for i in range(n_steps):
            if i in in_window:
                x = x + math.sqrt(t_hat[i] ** 2 - t[i] ** 2) * noise(i + 1)
            torch.testing.assert_close(recorder.inputs[i][0], x, rtol=1e-5, atol=1e-6)
            x = x * (t[i + 1] / t_hat[i])
        torch.testing.assert_close(x_end, x, rtol=1e-5, atol=1e-6)


def test_churn_zero_draws_no_noise_and_heun_evaluates_at_the_next_sigma():
    recorder = RecordingDenoiser(mixture())
    noise = RecordingNoise(1, torch.arange(6), SHAPE)
    sigmas = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX)
    sample_edm(recorder, noise, sigmas, solver="heun", s_churn=0.0, s_min=0.0)
    assert noise.draws == [0]
    t = sigmas.tolist()
    expected = [v for i in range(6) for v in ((t[i], t[i + 1]) if t[i + 1] > 0 else (t[i],))]
    assert recorder.sigmas == pytest.approx(expected, rel=1e-6)


def test_n_skipped_steps_churn_gamma_counts_the_steps_taken():
    recorder = RecordingDenoiser()
    cfg = {"name": "edm", "solver": "euler", "num_steps": 20, "n_skipped_steps": 5, "s_churn": 2.0}
    sample(recorder, IndexNoise(0, torch.arange(3), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    sigmas = edm_sigmas(20, SIGMA_MIN, SIGMA_MAX, 7.0, 5)
    assert len(recorder.inputs) == 15
    # the seed's gamma = S_churn / (N - n) = 2 / 15, not 2 / 20
    assert recorder.sigmas == pytest.approx((sigmas[:-1] * (1 + 2 / 15)).tolist(), rel=1e-6)


def test_churn_step_with_skipped_steps_by_hand():
    # N = 6, n = 2: 4 steps taken, gamma = min(1.2 / 4, sqrt(2) - 1) = 0.3; one Heun step by Karras et al. Alg. 2
    denoiser = AffineDenoiser()
    recorder = RecordingDenoiser(denoiser)
    noise = IndexNoise(3, torch.arange(4), SHAPE)
    cfg = {"name": "edm", "solver": "heun", "num_steps": 6, "n_skipped_steps": 2, "s_churn": 1.2, "s_max": 100.0}
    sample(recorder, noise, cfg, SIGMA_MIN, SIGMA_MAX)
    t = karras_sigmas(6, SIGMA_MIN, SIGMA_MAX).tolist()
    t0, t1 = t[0], t[3]  # t_1 and t_2 skipped
    gamma = 0.3
    t_hat = t0 * (1 + gamma)
    x0 = noise(0).double() * t0
    x_hat = x0 + math.sqrt(t_hat**2 - t0**2) * noise(1).double()  # S_noise = 1
    d = (x_hat - denoiser.exact(x_hat, t_hat)) / t_hat
    x_euler = x_hat + (t1 - t_hat) * d
    d_next = (x_euler - denoiser.exact(x_euler, t1)) / t1
    x1 = x_hat + (t1 - t_hat) * 0.5 * (d + d_next)
    # the denoiser's inputs: x̂_0 at t̂_0, the Euler guess at t_1, then x̂_1 = x_1 + sqrt(t̂_1² − t_1²) ε_2 at t̂_1
    assert recorder.sigmas[:3] == pytest.approx([t_hat, t1, t1 * (1 + gamma)], rel=1e-6)
    torch.testing.assert_close(recorder.inputs[0][0].double(), x_hat, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(recorder.inputs[1][0].double(), x_euler, rtol=1e-5, atol=1e-4)
    x1_hat = x1 + math.sqrt((t1 * (1 + gamma)) ** 2 - t1**2) * noise(2).double()
    # float32 rounding of x̂_0 (|x̂_0| ~ 150) grows by (t̂_0 - t_1) / (2 t_1) ~ 50 in the Heun correction
    torch.testing.assert_close(recorder.inputs[2][0].double(), x1_hat, rtol=1e-5, atol=1e-3)


BATCH_CONFIGS = [
    {"name": "edm", "num_steps": 8, "s_churn": 10.0},
    {"name": "edm", "solver": "euler", "num_steps": 8, "s_churn": 80.0, "s_noise": 1.003, "n_skipped_steps": 2},
    {"name": "dpmpp", "order": 3, "num_steps": 8},
    {"name": "ddim", "eta": 0.5, "num_steps": 8},
    {"name": "euler_ancestral", "num_steps": 8},
]


@pytest.mark.parametrize("cfg", BATCH_CONFIGS, ids=lambda c: c["name"])
def test_samples_do_not_depend_on_the_batch_split(cfg):
    whole = sample(mixture(), IndexNoise(11, torch.arange(10), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    part_a = sample(mixture(), IndexNoise(11, torch.tensor([7, 8, 9, 0, 1]), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    part_b = sample(mixture(), IndexNoise(11, torch.arange(2, 7), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    alone = sample(mixture(), IndexNoise(11, torch.tensor([4]), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(torch.cat([part_a[3:], part_b, part_a[:3]]), whole)
    assert torch.equal(alone[0], whole[4])
    other_seed = sample(mixture(), IndexNoise(12, torch.arange(10), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    assert not torch.equal(other_seed, whole)


NFE_CONFIGS = [
    ({"name": "edm"}, 35),
    ({"name": "edm", "num_steps": 1}, 1),
    ({"name": "edm", "solver": "euler", "num_steps": 7}, 7),
    ({"name": "edm", "num_steps": 10, "n_skipped_steps": 3}, 13),
    ({"name": "edm", "num_steps": 10, "s_churn": 5.0}, 19),
    ({"name": "dpmpp", "order": 2}, 20),
    ({"name": "dpmpp", "order": 3, "num_steps": 9}, 9),
    ({"name": "ddim", "num_steps": 12, "eta": 1.0}, 12),
    ({"name": "euler_ancestral", "num_steps": 11}, 11),
]


@pytest.mark.parametrize("cfg, nfe", NFE_CONFIGS)
def test_nfe_per_sample_counts_denoiser_calls(cfg, nfe):
    denoiser = mixture()
    sample(denoiser, IndexNoise(0, torch.arange(4), SHAPE), cfg, SIGMA_MIN, SIGMA_MAX)
    assert nfe_per_sample(cfg) == nfe == denoiser.rows // 4 == denoiser.calls


def test_sample_uses_the_model_sigma_range_where_the_config_is_null():
    recorder = RecordingDenoiser()
    sample(recorder, IndexNoise(0, torch.arange(2), SHAPE), {"name": "ddim", "num_steps": 3}, 0.01, 20.0)
    assert recorder.sigmas == pytest.approx(karras_sigmas(3, 0.01, 20.0)[:-1].tolist(), rel=1e-6)
    cfg = {"name": "dpmpp", "num_steps": 4, "sigma_min": 0.05, "sigma_max": None, "rho": 3.0}
    assert torch.equal(sampler_sigmas(cfg, 0.01, 20.0), karras_sigmas(4, 0.05, 20.0, rho=3.0))


BAD_CONFIGS = [
    ({"name": "heunx"}, "sampler.name"),
    ({"num_steps": 10}, "sampler.name"),
    ({"name": "edm", "churn": 1.0}, "sampler.churn"),
    ({"name": "ddim", "s_churn": 1.0}, "sampler.s_churn"),
    ({"name": "dpmpp", "eta": 0.0}, "sampler.eta"),
    ({"name": "edm", "num_steps": 0}, "sampler.num_steps"),
    ({"name": "ddim", "num_steps": 2.5}, "sampler.num_steps"),
    ({"name": "edm", "s_churn": -1.0}, "sampler.s_churn"),
    ({"name": "edm", "s_noise": 0.0}, "sampler.s_noise"),
    ({"name": "euler_ancestral", "s_noise": -1.0}, "sampler.s_noise"),
    ({"name": "edm", "rho": 0.0}, "sampler.rho"),
    ({"name": "dpmpp", "rho": -2.0}, "sampler.rho"),
    ({"name": "edm", "sigma_min": 1.0, "sigma_max": 0.5}, "sampler.sigma_min"),
    ({"name": "edm", "sigma_min": 0.0}, "sampler.sigma_min"),
    ({"name": "edm", "sigma_min": 100.0}, "sampler.sigma_min"),  # above the model's sigma_max (80)
    ({"name": "ddim", "sigma_max": -1.0}, "sampler.sigma_max"),
    ({"name": "edm", "solver": "rk4"}, "sampler.solver"),
    ({"name": "dpmpp", "order": 1}, "sampler.order"),
    ({"name": "dpmpp", "order": 4}, "sampler.order"),
    ({"name": "ddim", "eta": -0.1}, "sampler.eta"),
    ({"name": "euler_ancestral", "eta": -1.0}, "sampler.eta"),
    ({"name": "edm", "num_steps": 10, "n_skipped_steps": 10}, "sampler.n_skipped_steps"),
    ({"name": "edm", "n_skipped_steps": -1}, "sampler.n_skipped_steps"),
    ({"name": "edm", "s_min": 1.0, "s_max": 0.5}, "sampler.s_max"),
]


@pytest.mark.parametrize("cfg, key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_sampler_configs_fail_before_any_work(cfg, key):
    denoiser, noise = mixture(), RecordingNoise(0, torch.arange(2), SHAPE)
    with pytest.raises(UsageError) as info:
        sample(denoiser, noise, cfg, SIGMA_MIN, SIGMA_MAX)
    message = str(info.value)
    assert message.startswith(f"{key}=") and "\n" not in message and "allowed" in message
    assert denoiser.calls == 0 and noise.draws == []
    if cfg.get("sigma_min") != 100.0:  # that one is wrong only against the model's range
        with pytest.raises(UsageError, match=key.replace(".", r"\.")):
            check_sampler_config(cfg)


@pytest.mark.parametrize("path", sorted(SAMPLER_CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_sampler_yamls_are_valid_and_complete(path):
    cfg = OmegaConf.load(path)
    check_sampler_config(cfg)
    assert cfg.name == path.stem
    assert set(cfg.keys()) - {"name"} == set(SAMPLER_DEFAULTS[cfg.name])  # every parameter exposed
    assert OmegaConf.to_container(cfg) == {"name": cfg.name, **SAMPLER_DEFAULTS[cfg.name]}
    assert nfe_per_sample(cfg) >= 1
    if cfg.name == "edm":
        assert isinstance(cfg.s_max, float) and cfg.s_max == math.inf


def test_all_sampler_families_have_a_yaml():
    assert {p.stem for p in SAMPLER_CONF.glob("*.yaml")} == set(SAMPLER_DEFAULTS)


def test_sampling_does_not_import_lightning():
    code = "import sys, biasamp.sampling; sys.exit(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') " \
           "for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------------------ guidance

LABEL_OFFSETS = torch.tensor([[1.0, 2.0], [-3.0, 0.5], [4.0, -1.0]])  # per class, per channel (K = 3, C = 2)


class FakeNet:
    """net(x, sigma, labels) = 0.5 x + 0.1 sigma + labels @ LABEL_OFFSETS (+ 7 for labels None); records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, torch.Tensor | None]] = []

    def __call__(self, x, sigma, class_labels):
        self.calls.append((x.shape[0], None if class_labels is None else class_labels.clone()))
        base = 0.5 * x + 0.1 * sigma.reshape(-1, 1, 1, 1)
        if class_labels is None:
            return base + 7.0
        return base + (class_labels @ LABEL_OFFSETS)[:, :, None, None]


def guidance_inputs(batch: int = 4):
    x = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.linspace(0.5, 3.0, batch)
    labels = torch.tensor([0, 2, 1, 2])[:batch]
    base = 0.5 * x + 0.1 * sigma.reshape(-1, 1, 1, 1)
    offset = LABEL_OFFSETS[labels][:, :, None, None]
    return x, sigma, one_hot(labels, 3), base, offset


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guidance_arithmetic_null(w):
    x, sigma, labels, base, offset = guidance_inputs()
    net = FakeNet()
    d = guided_denoiser(net, labels, guidance=w)
    out = d(x, sigma)
    # D_cond = base + offset, D_null = base: (1 + w) D_cond - w D_null = base + (1 + w) offset
    torch.testing.assert_close(out, base + (1 + w) * offset)
    assert len(net.calls) == 1  # cond and uncond in one forward
    rows, seen = net.calls[0]
    if w == 0:
        assert rows == 4 and torch.equal(seen, labels) and d.nfe == 1
    else:
        assert rows == 8 and torch.equal(seen[:4], labels) and torch.equal(seen[4:], torch.zeros(4, 3))
        assert d.nfe == 2


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guidance_class_mean(w):
    x, sigma, labels, base, offset = guidance_inputs()
    net = FakeNet()
    d = guided_denoiser(net, labels, guidance=w, uncond="class_mean")
    out = d(x, sigma)
    d_uncond = base + LABEL_OFFSETS.mean(0)[None, :, None, None]  # mean over e_1..e_K of D(x; sigma, e_k)
    torch.testing.assert_close(out, (1 + w) * (base + offset) - w * d_uncond)
    assert len(net.calls) == 1
    rows, seen = net.calls[0]
    if w > 0:
        assert rows == 4 * 4 and d.nfe == 4  # (K + 1) B rows
        assert torch.equal(seen[4:].reshape(3, 4, 3), torch.eye(3)[:, None, :].expand(3, 4, 3))
    else:
        assert rows == 4 and d.nfe == 1


def test_guidance_conventions_agree():
    dc, du = torch.randn(5, 3), torch.randn(5, 3)
    for scale in (1.0, 2.0, 4.5):
        w = guidance_from_scale(scale)
        torch.testing.assert_close(apply_guidance(dc, du, w), du + scale * (dc - du))
        torch.testing.assert_close(apply_guidance(dc, du, w), (1 + w) * dc - w * du)
    torch.testing.assert_close(apply_guidance(dc, du, 0.0), dc)
    with pytest.raises(UsageError, match=r"^guidance scale=0\.5 is not allowed"):
        guidance_from_scale(0.5)


def test_guidance_interval():
    x, _, labels, _, _ = guidance_inputs(3)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    base = 0.5 * x + 0.1 * sigma.reshape(-1, 1, 1, 1)
    offset = LABEL_OFFSETS[labels.argmax(1)][:, :, None, None]
    net = FakeNet()
    d = guided_denoiser(net, labels, guidance=2.0, interval=(1.0, 5.0))
    out = d(x, sigma)
    torch.testing.assert_close(out[1], (base + 3 * offset)[1])  # inside: guided
    torch.testing.assert_close(out[[0, 2]], (base + offset)[[0, 2]])  # outside: plain conditional
    assert net.calls[0][0] == 6 and d.nfe == 2
    out = d(x, torch.full((3,), 20.0))  # nobody inside: one B-row forward
    torch.testing.assert_close(out, 0.5 * x + 2.0 + offset)
    assert net.calls[1][0] == 3 and d.nfe == 3
    d(x, torch.full((3,), 5.0))  # the interval is closed
    assert net.calls[2][0] == 6 and d.nfe == 5


def test_guidance_unconditional_labels_and_nfe():
    x, sigma, _, base, _ = guidance_inputs()
    net = FakeNet()
    d = guided_denoiser(net, None, guidance=3.0)
    torch.testing.assert_close(d(x, sigma), base + 7.0)  # net(x, sigma, None), no guidance
    assert net.calls == [(4, None)] and d.nfe == 1
    d(x, sigma)
    assert d.nfe == 2 and d.calls == 2


def test_guidance_rejects_bad_values():
    with pytest.raises(UsageError, match="^guidance=-1.0 is not allowed"):
        guided_denoiser(FakeNet(), None, guidance=-1.0)
    with pytest.raises(UsageError, match="^guidance=nan is not allowed"):
        guided_denoiser(FakeNet(), None, guidance=float("nan"))
    with pytest.raises(UsageError, match="^guidance_uncond='mean' is not allowed"):
        guided_denoiser(FakeNet(), None, guidance=1.0, uncond="mean")
    with pytest.raises(UsageError, match=r"^guidance_interval=\(5\.0, 1\.0\) is not allowed"):
        guided_denoiser(FakeNet(), None, guidance=1.0, interval=(5.0, 1.0))
    with pytest.raises(UsageError, match="^guidance_interval=.*give \\[lo, hi\\]"):
        guided_denoiser(FakeNet(), None, guidance=1.0, interval=("low", "high"))
    x, _, labels, _, _ = guidance_inputs(3)
    with pytest.raises(ValueError, match="class_labels"):  # a caller's tensor, not a user's setting
        guided_denoiser(FakeNet(), labels[:, :1], guidance=1.0, label_dim=labels.shape[1])


class ZeroNet(nn.Module):
    def forward(self, x, c_noise, class_labels):
        return torch.zeros_like(x) + class_labels.sum(1).reshape(-1, 1, 1, 1)


def test_guided_edm_precond_runs_through_a_sampler():
    precond = EDMPrecond(ZeroNet(), label_dim=3)
    labels = one_hot(torch.tensor([0, 1, 2, 1]), 3)
    d = guided_denoiser(precond, labels, guidance=1.5)
    cfg = {"name": "edm", "num_steps": 4}
    x = sample(d, IndexNoise(0, torch.arange(4), (3, 4, 4)), cfg, precond.sigma_min, precond.sigma_max)
    assert x.shape == (4, 3, 4, 4) and torch.isfinite(x).all()
    assert d.nfe == 2 * nfe_per_sample(cfg)
