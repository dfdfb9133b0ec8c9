"""Shared fixtures: small models, and the real model/data from VITPRUNE_SHARED when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vitprune.models import BlockConfig, ViT, ViTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITPRUNE_SHARED", REPO.parent / "shared"))
SHARED_MODEL = SHARED / "models" / "vit_tiny_patch16_224.tinyimagenet200"
SHARED_DATA = SHARED / "data" / "tiny-imagenet-200"

torch.set_num_threads(1)  # small test models: one thread is fastest and deterministic


def pytest_collection_modifyitems(config, items):
    if SHARED_MODEL.is_dir() and SHARED_DATA.is_dir():
        return
    if os.environ.get("CI") and any("shared" in item.keywords for item in items):
        # CI must not hide missing data: the real-model tests are part of what a green run promises
        raise pytest.UsageError(f"CI is set but the real model/data are not under {SHARED} (set VITPRUNE_SHARED)")
    skip = pytest.mark.skip(reason=f"real model/data not found under {SHARED}")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config() -> ViTConfig:
    """A dense 4-block ViT on 32x32 inputs."""
    return ViTConfig.uniform(embed_dim=32, depth=4, heads=4, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)


@pytest.fixture
def ragged_config() -> ViTConfig:
    """A non-uniform architecture: different heads/QK/V/MLP per block, an emptied attention, no MLP."""
    blocks = [BlockConfig(4, 8, 8, 64), BlockConfig(2, 4, 12, 40), BlockConfig(0, 0, 0, 24), BlockConfig(3, 8, 4, 0)]
    return ViTConfig(embed_dim=24, blocks=blocks, num_classes=7, img_size=32, patch_size=8, distilled=True)


@pytest.fixture
def tiny_model(tiny_config) -> ViT:
    torch.manual_seed(0)
    return ViT(tiny_config).eval()
