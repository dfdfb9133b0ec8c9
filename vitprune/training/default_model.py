"""The embedded default model: a small ViT trained from scratch on Fashion-MNIST by ``vitprune train``.

It ships in ``vitprune/assets/fashion_mnist_vit`` (config.json + model.safetensors + meta.json with the exact
command, accuracy, wall time and machine) and is the demo model for pruning without any download.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from vitprune.errors import VitPruneError
from vitprune.models.config import ViTConfig
from vitprune.models.io import is_model_dir, load
from vitprune.models.vit import ViT

ASSET_NAME = "fashion_mnist_vit"

# Architecture of the shipped model: several heads, MLP ratio 4, width a multiple of 8.
DEFAULT_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "depth": 6,
    "heads": 4,
    "mlp_ratio": 4.0,
    "patch_size": 7,
    "global_pool": "token",
}


def fashion_mnist_config(
    embed_dim: int = DEFAULT_ARCH["embed_dim"],
    depth: int = DEFAULT_ARCH["depth"],
    heads: int = DEFAULT_ARCH["heads"],
    mlp_ratio: float = DEFAULT_ARCH["mlp_ratio"],
    patch_size: int = DEFAULT_ARCH["patch_size"],
    global_pool: str = DEFAULT_ARCH["global_pool"],
) -> ViTConfig:
    """A ViT for 28x28 grey images and the 10 Fashion-MNIST classes (class token, timm layout).

    ``global_pool="avg"`` classifies the mean of the patch tokens (the class token is kept for the layout).
    """
    from vitprune.data.fashion_mnist import CLASSES, MEAN, STD

    return ViTConfig.uniform(
        embed_dim=embed_dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=len(CLASSES),
        img_size=28,
        patch_size=patch_size,
        in_chans=1,
        global_pool=global_pool,
        name=f"vit_fashion_mnist_d{embed_dim}_l{depth}_h{heads}_p{patch_size}",
        extra={"dataset": "fashion-mnist", "mean": [MEAN], "std": [STD], "classes": list(CLASSES)},
    )


def default_model_dir() -> Path:
    """Path of the shipped model directory inside the installed package."""
    return Path(str(resources.files("vitprune") / "assets" / ASSET_NAME))


def load_default_model() -> ViT:
    """The shipped Fashion-MNIST ViT in eval mode (inputs: ``FashionMNIST`` tensors, normalised)."""
    d = default_model_dir()
    if not is_model_dir(d):
        raise VitPruneError(f"the default model is missing from the package ({d}); reinstall vitprune")
    return load(d).eval()


def default_model_meta() -> dict[str, Any]:
    """The shipped model's ``meta.json``: command, test accuracy, wall time, machine."""
    path = default_model_dir() / "meta.json"
    if not path.is_file():
        raise VitPruneError(f"the default model has no meta.json ({path})")
    return json.loads(path.read_text())
