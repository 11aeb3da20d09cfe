"""Training: the LightningModule, EMA, lr schedules, checkpoints, the run's identity and files, config checks."""

from biasamp.training.checkpointing import CheckpointCallback, find_resume_checkpoint
from biasamp.training.config_checks import check_train_config
from biasamp.training.ema import EMA, ema_beta
from biasamp.training.module import DiffusionModule, NonFiniteLossError

__all__ = [
    "EMA",
    "CheckpointCallback",
    "DiffusionModule",
    "NonFiniteLossError",
    "check_train_config",
    "ema_beta",
    "find_resume_checkpoint",
]
