"""Models: the DDPM++ network, EDM preconditioning, the EDM loss and the config-driven builder."""

from biasamp.models.build import build_denoiser, check_model_config
from biasamp.models.ddpmpp import DDPMpp
from biasamp.models.loss import WEIGHTINGS, EDMLoss, check_loss_config, loss_weight
from biasamp.models.precond import EDMPrecond, null_labels, one_hot

__all__ = [
    "DDPMpp",
    "EDMLoss",
    "EDMPrecond",
    "WEIGHTINGS",
    "build_denoiser",
    "check_loss_config",
    "check_model_config",
    "loss_weight",
    "null_labels",
    "one_hot",
]
