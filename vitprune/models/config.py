"""Serialisable architecture description of a (possibly pruned) Vision Transformer.

A pruned ViT is described by one global embedding width plus, per block, its number of heads, per-head
query/key width, per-head value width and MLP hidden width. The attention scale is stored, never derived
from the current query/key width: pruning QK dims must not change the softmax temperature.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from vitprune.errors import VitPruneError


@dataclass
class BlockConfig:
    """One transformer block. ``heads == 0`` or ``mlp_dim == 0`` means that branch only adds its bias."""

    heads: int
    qk_dim: int
    v_dim: int
    mlp_dim: int
    scale: float | None = None

    def __post_init__(self) -> None:
        for name in ("heads", "qk_dim", "v_dim", "mlp_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise VitPruneError(f"block {name} must be a non-negative integer, got {value!r}")
        if self.scale is None:
            self.scale = float(self.qk_dim) ** -0.5 if self.qk_dim > 0 else 1.0
        self.scale = float(self.scale)


@dataclass
class ViTConfig:
    """Whole-model architecture; ``to_dict``/``from_dict`` round-trip exactly through JSON."""

    embed_dim: int
    blocks: list[BlockConfig]
    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    class_token: bool = True
    distilled: bool = False
    global_pool: str = "token"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    pos_grid: int | None = None
    drop_path_rate: float = 0.0
    preprocess: dict[str, Any] | None = None
    name: str = "vit"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in self.blocks]
        if self.embed_dim <= 0:
            raise VitPruneError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.patch_size <= 0 or self.img_size % self.patch_size:
            raise VitPruneError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.global_pool not in ("token", "avg"):
            raise VitPruneError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise VitPruneError("global_pool 'token' needs class_token=True")
        if self.distilled and not self.class_token:
            raise VitPruneError("a distilled model needs a class token")
        if self.pos_grid is None:
            self.pos_grid = self.img_size // self.patch_size

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def uniform(
        cls,
        embed_dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        **kwargs: Any,
    ) -> ViTConfig:
        """A dense timm/DeiT-style ViT: every block has the same shape."""
        if heads <= 0 or embed_dim % heads:
            raise VitPruneError(f"embed_dim {embed_dim} is not divisible by heads {heads}")
        hd = embed_dim // heads
        blocks = [BlockConfig(heads, hd, hd, int(embed_dim * mlp_ratio)) for _ in range(depth)]
        return cls(embed_dim=embed_dim, blocks=blocks, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise VitPruneError(f"unknown config keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required keys
            raise VitPruneError(f"invalid config: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VitPruneError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise VitPruneError("config JSON must be an object")
        return cls.from_dict(data)

    def is_uniform(self) -> bool:
        return len({(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in self.blocks}) <= 1
