"""Analytic parameter and MAC counts of a (possibly pruned, ragged) :class:`~vitprune.models.ViT`.

Counts come from the architecture alone (:class:`~vitprune.models.ViTConfig`), so they hold for any per-block
shape, emptied branches, a distillation token, average pooling and other input sizes. Gates (masks) are not
looked at: the counts are those of the physical tensors, i.e. of the model after surgery.

Conventions (as in fvcore / timm "GMACs" and ``torch.utils.flop_counter``):

- one MAC is one multiply-accumulate of a matrix product or convolution, per image;
- FLOPs = 2 * MACs (:func:`count_flops`);
- bias additions, LayerNorm, softmax, GELU, the attention scale, residual additions, gates, position-embedding
  addition / interpolation and average pooling are *not* counted (they are O(tokens * width), a fraction of a
  percent of a ViT's compute; ``FlopCounterMode`` ignores them as well).

Per block with ``N`` tokens, embedding width ``D``, ``h`` heads, per-head query/key width ``q``, value width
``v`` and MLP width ``m``:

- ``qkv = N * D * h * (2q + v)``, ``attn_scores = h * N^2 * q`` (Q K^T), ``attn_v = h * N^2 * v``,
  ``proj = N * h * v * D``; ``fc1 = fc2 = N * D * m``.
- ``h == 0`` or ``v == 0``: the attention branch only adds its bias (no MACs); ``q == 0``: attention is uniform
  and computed as a mean over tokens (no score / attn-v products); ``m == 0``: the MLP only adds its bias.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitprune.errors import VitPruneError
from vitprune.models.config import BlockConfig, ViTConfig

ImgSize = int | tuple[int, int] | None


def resolve_config(model_or_config: nn.Module | ViTConfig) -> ViTConfig:
    """The :class:`ViTConfig` of a ViT (its ``.config``) or the config itself."""
    if isinstance(model_or_config, ViTConfig):
        return model_or_config
    cfg = getattr(model_or_config, "config", None)
    if isinstance(cfg, ViTConfig):
        return cfg
    raise VitPruneError(f"expected a vitprune ViT or ViTConfig, got {type(model_or_config).__name__}")


def _grid(cfg: ViTConfig, img_size: ImgSize) -> tuple[int, int]:
    """Patch grid of the stride-``patch`` convolution for an input of ``img_size`` (int or (H, W))."""
    if img_size is None:
        img_size = cfg.img_size
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h < cfg.patch_size or w < cfg.patch_size:
        raise VitPruneError(f"image size {h}x{w} is smaller than the patch size {cfg.patch_size}")
    return h // cfg.patch_size, w // cfg.patch_size


def block_macs(dim: int, block: BlockConfig, tokens: int) -> dict[str, int]:
    """MACs of one pre-norm block per image (see the module docstring for the formulas)."""
    n, h, q, v, m = tokens, block.heads, block.qk_dim, block.v_dim, block.mlp_dim
    attn_active = h > 0 and v > 0
    out = {
        "qkv": n * dim * h * (2 * q + v) if attn_active else 0,
        "attn_scores": h * n * n * q if attn_active else 0,
        "attn_v": h * n * n * v if attn_active and q > 0 else 0,
        "proj": n * h * v * dim if attn_active else 0,
        "fc1": n * dim * m,
        "fc2": n * m * dim,
    }
    out["attn"] = out["qkv"] + out["attn_scores"] + out["attn_v"] + out["proj"]
    out["mlp"] = out["fc1"] + out["fc2"]
    out["total"] = out["attn"] + out["mlp"]
    return out


def count_macs(model_or_config: nn.Module | ViTConfig, img_size: ImgSize = None) -> dict[str, Any]:
    """MACs of one image's forward pass.

    Returns ``{"total", "per_block": [{"qkv", "attn_scores", "attn_v", "proj", "attn", "fc1", "fc2", "mlp",
    "total"}, ...], "blocks", "patch_embed", "head", "tokens", "img_size"}``.
    """
    cfg = resolve_config(model_or_config)
    gh, gw = _grid(cfg, img_size)
    tokens = cfg.num_prefix_tokens + gh * gw
    d = cfg.embed_dim
    patch_embed = gh * gw * cfg.in_chans * cfg.patch_size**2 * d
    per_block = [block_macs(d, b, tokens) for b in cfg.blocks]
    n_heads = 2 if cfg.distilled and cfg.global_pool == "token" else 1
    head = n_heads * d * cfg.num_classes
    blocks = sum(b["total"] for b in per_block)
    return {
        "total": patch_embed + blocks + head,
        "per_block": per_block,
        "blocks": blocks,
        "patch_embed": patch_embed,
        "head": head,
        "tokens": tokens,
        "img_size": (gh * cfg.patch_size, gw * cfg.patch_size),
    }


def count_flops(model_or_config: nn.Module | ViTConfig, img_size: ImgSize = None) -> int:
    """FLOPs of one image's forward pass: ``2 * count_macs(...)["total"]``."""
    return 2 * count_macs(model_or_config, img_size)["total"]


def block_params(dim: int, block: BlockConfig, qkv_bias: bool = True) -> dict[str, int]:
    """Parameters of one block: LayerNorms, attention (qkv + proj) and MLP (fc1 + fc2), biases included."""
    h, q, v, m = block.heads, block.qk_dim, block.v_dim, block.mlp_dim
    qkv_out = h * (2 * q + v)
    attn = dim * qkv_out + (qkv_out if qkv_bias else 0) + h * v * dim + dim
    mlp = dim * m + m + m * dim + dim
    norms = 4 * dim
    return {"attn": attn, "mlp": mlp, "norm": norms, "total": attn + mlp + norms}


def params_breakdown(model_or_config: nn.Module | ViTConfig) -> dict[str, Any]:
    """Parameter count by part: ``{"total", "per_block", "embed", "head", "norm"}``.

    ``embed`` = patch projection + class/distillation tokens + position embeddings. Equals
    :func:`vitprune.models.num_params` of the module (gates are not parameters of the architecture).
    """
    cfg = resolve_config(model_or_config)
    d = cfg.embed_dim
    embed = d * cfg.in_chans * cfg.patch_size**2 + d
    embed += d * cfg.num_prefix_tokens + d * (cfg.num_prefix_tokens + cfg.pos_grid**2)
    per_block = [block_params(d, b, cfg.qkv_bias) for b in cfg.blocks]
    n_heads = 2 if cfg.distilled else 1
    head = n_heads * (d * cfg.num_classes + cfg.num_classes) if cfg.num_classes > 0 else 0
    norm = 2 * d
    total = embed + sum(b["total"] for b in per_block) + norm + head
    return {"total": total, "per_block": per_block, "embed": embed, "head": head, "norm": norm}


def count_params(model_or_config: nn.Module | ViTConfig) -> int:
    """Total number of parameters of the architecture (see :func:`params_breakdown`)."""
    return params_breakdown(model_or_config)["total"]


def format_count(n: float, unit: str = "") -> str:
    """Human-readable count: ``5563016 -> '5.56M'``, ``1.26e9 -> '1.26G'``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"
