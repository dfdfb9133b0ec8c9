"""Named dense ViT / DeiT architectures (timm model names) and their evaluation preprocessing.

Tensor shapes say almost everything about a checkpoint's architecture, but not the number of attention heads;
a preset supplies it (and the defaults a fresh model is built with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitprune.errors import VitPruneError
from vitprune.models.config import ViTConfig


@dataclass(frozen=True)
class Preset:
    """A dense, uniform ViT: every block has ``heads`` heads of width ``embed_dim // heads``."""

    name: str
    embed_dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224
    distilled: bool = False
    num_classes: int = 1000
    preprocess: str = "imagenet"  # a vitprune.data.transforms preset name
    norm_eps: float = 1e-6
    global_pool: str = "token"

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def config(self, num_classes: int | None = None, **overrides: Any) -> ViTConfig:
        """A :class:`ViTConfig` for this architecture (``overrides`` are passed to ``ViTConfig``)."""
        kwargs: dict[str, Any] = {
            "num_classes": self.num_classes if num_classes is None else num_classes,
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "distilled": self.distilled,
            "norm_eps": self.norm_eps,
            "global_pool": self.global_pool,
            "name": self.name,
            "preprocess": {"preset": self.preprocess},
        }
        kwargs.update(overrides)
        return ViTConfig.uniform(self.embed_dim, self.depth, self.heads, self.mlp_ratio, **kwargs)


def _presets() -> dict[str, Preset]:
    sizes = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
    out: dict[str, Preset] = {}
    for size, (dim, heads) in sizes.items():
        # timm's augreg ViTs are evaluated with mean = std = 0.5, crop 0.9, bicubic ("inception").
        out[f"vit_{size}_patch16_224"] = Preset(f"vit_{size}_patch16_224", dim, 12, heads, preprocess="inception")
        out[f"deit_{size}_patch16_224"] = Preset(f"deit_{size}_patch16_224", dim, 12, heads)
        name = f"deit_{size}_distilled_patch16_224"
        out[name] = Preset(name, dim, 12, heads, distilled=True)
    out["vit_base_patch32_224"] = Preset("vit_base_patch32_224", 768, 12, 12, patch_size=32, preprocess="inception")
    out["vit_large_patch16_224"] = Preset("vit_large_patch16_224", 1024, 24, 16, preprocess="inception")
    return out


PRESETS: dict[str, Preset] = _presets()


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """Look up a preset by timm name; a pretrained tag (``vit_tiny_patch16_224.augreg_in21k``) is ignored."""
    key = str(name).strip().lower().split(".", 1)[0]
    if key not in PRESETS:
        raise VitPruneError(f"unknown model preset {name!r}; known presets: {', '.join(list_presets())}")
    return PRESETS[key]
