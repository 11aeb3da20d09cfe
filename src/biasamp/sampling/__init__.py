"""Sampling: index-addressed noise, sigma schedules, samplers over a denoiser, classifier-free guidance.

A sampler is a plain function ``sample_x(denoiser, noise, sigmas, ...) -> x`` (k-diffusion style); ``sample``
dispatches on a ``conf/sampler/*.yaml`` config. Nothing here depends on Lightning.
"""

from biasamp.sampling.guidance import (
    UNCOND_MODES,
    GuidedDenoiser,
    apply_guidance,
    guidance_from_scale,
    guided_denoiser,
)
from biasamp.sampling.noise import IndexNoise, index_noise
from biasamp.sampling.samplers import (
    SAMPLER_DEFAULTS,
    Denoiser,
    check_sampler_config,
    evaluated_sigmas,
    nfe_per_sample,
    resolve_sampler_config,
    sample,
    sample_ddim,
    sample_dpmpp,
    sample_edm,
    sample_euler_ancestral,
    sampler_sigmas,
)
from biasamp.sampling.schedules import edm_sigmas, karras_sigmas, skip_steps

__all__ = [
    "SAMPLER_DEFAULTS",
    "UNCOND_MODES",
    "Denoiser",
    "GuidedDenoiser",
    "IndexNoise",
    "apply_guidance",
    "check_sampler_config",
    "edm_sigmas",
    "evaluated_sigmas",
    "guidance_from_scale",
    "guided_denoiser",
    "index_noise",
    "karras_sigmas",
    "nfe_per_sample",
    "resolve_sampler_config",
    "sample",
    "sample_ddim",
    "sample_dpmpp",
    "sample_edm",
    "sample_euler_ancestral",
    "sampler_sigmas",
    "skip_steps",
]
