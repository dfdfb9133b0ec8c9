"""Model representation: config, module, save/load."""

from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.models.io import attach_gate, load, save
from vitprune.models.vit import ViT, num_params

__all__ = ["BlockConfig", "ViT", "ViTConfig", "attach_gate", "load", "num_params", "save"]
