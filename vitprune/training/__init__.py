"""The training engine every pruner uses: losses, augmentation, masks, checkpoints, DDP, the Trainer."""

from vitprune.training.engine import TrainConfig, Trainer
from vitprune.training.losses import DistillationLoss
from vitprune.training.masks import WeightMasks

__all__ = ["DistillationLoss", "TrainConfig", "Trainer", "WeightMasks"]
