"""vitprune: make Vision Transformers smaller and faster by pruning, with measured accuracy and speed."""

from vitprune.api import prune
from vitprune.errors import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig, load, num_params, save

__version__ = "0.1.0"

__all__ = [
    "BlockConfig",
    "ViT",
    "ViTConfig",
    "VitPruneError",
    "__version__",
    "load",
    "num_params",
    "prune",
    "save",
]
