"""Every prunable structural group of a :class:`~vitprune.models.ViT` and the tensor slices it removes.

Group kinds (METHODS.md section 1; NViT Sec. 3.1):

========  ==========================================================================================
``heads`` head h of block b: its q, k, v rows (weights and biases) and its ``proj`` input columns
``qk``    QK dim j of block b, aligned across heads: row j of q and of k in every head
``v``     V dim j of block b, aligned across heads: row j of v in every head and the matching ``proj``
          input column of every head
``mlp``   MLP neuron j of block b: ``fc1`` row j and bias j, ``fc2`` column j
``emb``   embedding channel c (global): patch-embed output channel and bias, cls/dist token, pos_embed,
          every LayerNorm weight/bias, every qkv/fc1 input column, every proj/fc2 output row and bias,
          final norm, classifier input column(s)
``block`` the whole block b (every parameter of ``blocks.b``)
========  ==========================================================================================

The fused ``qkv`` weight is laid out ``[q (H*dq) | k (H*dq) | v (H*dv)]``, head-major inside each part, so QK dim
j of head h is row ``h*dq + j`` of q (and ``H*dq + h*dq + j`` overall for k).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.models.config import BlockConfig, ViTConfig

KINDS = ("heads", "qk", "v", "mlp", "emb", "block")
BLOCK_UNIT_KINDS = ("heads", "qk", "v", "mlp")


@dataclass(frozen=True)
class Group:
    """One prunable group: ``kind`` in :data:`KINDS`, ``block`` (None for ``emb``), unit ``index``."""

    kind: str
    block: int | None
    index: int

    @property
    def key(self) -> str:
        return unit_key(self.kind, self.block)


@dataclass(frozen=True)
class TensorSlice:
    """Elements ``index`` along dimension ``dim`` of parameter ``name`` (all other dims entirely)."""

    name: str
    dim: int
    index: Tensor


def unit_key(kind: str, block: int | None = None) -> str:
    """Key of one unit vector: ``"emb"`` or ``"blocks.{b}.{kind}"`` (kind in heads/qk/v/mlp/block)."""
    if kind == "emb":
        return "emb"
    if kind not in KINDS:
        raise VitPruneError(f"unknown group kind {kind!r} (expected one of {', '.join(KINDS)})")
    return f"blocks.{block}.{kind}"


def parse_key(key: str) -> tuple[str, int | None]:
    """Inverse of :func:`unit_key`."""
    if key == "emb":
        return "emb", None
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] not in KINDS:
        raise VitPruneError(f"bad unit key {key!r}")
    return parts[2], int(parts[1])


def unit_count(config: ViTConfig, kind: str, block: int | None = None) -> int:
    """Number of units of ``kind`` (in ``block``) in an architecture."""
    if kind == "emb":
        return config.embed_dim
    if kind == "block":
        return 1
    b = config.blocks[block]
    return {"heads": b.heads, "qk": b.qk_dim, "v": b.v_dim, "mlp": b.mlp_dim}[kind]


def qkv_rows(cfg: BlockConfig, part: str, heads: Tensor | None = None, dims: Tensor | None = None) -> Tensor:
    """Row indices of ``part`` ("q", "k" or "v") of the fused qkv weight for the given heads x dims.

    Rows come head-major (all ``dims`` of the first head, then the next head), the order surgery keeps.
    """
    h, dq, dv = cfg.heads, cfg.qk_dim, cfg.v_dim
    width, offset = {"q": (dq, 0), "k": (dq, h * dq), "v": (dv, 2 * h * dq)}[part]
    heads = torch.arange(h) if heads is None else torch.as_tensor(heads, dtype=torch.long)
    dims = torch.arange(width) if dims is None else torch.as_tensor(dims, dtype=torch.long)
    return (offset + heads[:, None] * width + dims[None, :]).reshape(-1)


def proj_cols(cfg: BlockConfig, heads: Tensor | None = None, dims: Tensor | None = None) -> Tensor:
    """Input-column indices of ``proj`` for the given heads x V dims (head-major)."""
    heads = torch.arange(cfg.heads) if heads is None else torch.as_tensor(heads, dtype=torch.long)
    dims = torch.arange(cfg.v_dim) if dims is None else torch.as_tensor(dims, dtype=torch.long)
    return (heads[:, None] * cfg.v_dim + dims[None, :]).reshape(-1)


def param_names(config: ViTConfig) -> list[str]:
    """Names of every (non-gate) parameter of ``ViT(config)``."""
    names = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    names += [n for n, on in (("cls_token", config.class_token), ("dist_token", config.distilled)) if on]
    names.append("pos_embed")
    for b in range(config.depth):
        names += block_param_names(config, b)
    names += ["norm.weight", "norm.bias"]
    if config.num_classes > 0:
        names += ["head.weight", "head.bias"]
        if config.distilled:
            names += ["head_dist.weight", "head_dist.bias"]
    return names


def block_param_names(config: ViTConfig, b: int) -> list[str]:
    p = f"blocks.{b}."
    names = [p + "norm1.weight", p + "norm1.bias", p + "attn.qkv.weight"]
    if config.qkv_bias:
        names.append(p + "attn.qkv.bias")
    names += [p + "attn.proj.weight", p + "attn.proj.bias", p + "norm2.weight", p + "norm2.bias"]
    names += [p + "mlp.fc1.weight", p + "mlp.fc1.bias", p + "mlp.fc2.weight", p + "mlp.fc2.bias"]
    return names


def emb_axes(config: ViTConfig) -> list[tuple[str, int]]:
    """``(param name, dim)`` of every tensor axis that is indexed by the embedding channel."""
    axes = [("patch_embed.proj.weight", 0), ("patch_embed.proj.bias", 0)]
    axes += [(n, 2) for n, on in (("cls_token", config.class_token), ("dist_token", config.distilled)) if on]
    axes.append(("pos_embed", 2))
    for b in range(config.depth):
        p = f"blocks.{b}."
        axes += [(p + "norm1.weight", 0), (p + "norm1.bias", 0), (p + "attn.qkv.weight", 1)]
        axes += [(p + "attn.proj.weight", 0), (p + "attn.proj.bias", 0)]
        axes += [(p + "norm2.weight", 0), (p + "norm2.bias", 0), (p + "mlp.fc1.weight", 1)]
        axes += [(p + "mlp.fc2.weight", 0), (p + "mlp.fc2.bias", 0)]
    axes += [("norm.weight", 0), ("norm.bias", 0)]
    if config.num_classes > 0:
        axes.append(("head.weight", 1))
        if config.distilled:
            axes.append(("head_dist.weight", 1))
    return axes


def _idx(values: Iterable[int] | Tensor) -> Tensor:
    return torch.as_tensor(list(values) if not isinstance(values, Tensor) else values, dtype=torch.long)


def group_slices(config: ViTConfig, group: Group) -> list[TensorSlice]:
    """Every tensor slice that removing ``group`` zeroes / deletes (METHODS.md section 1 table)."""
    kind, b, i = group.kind, group.block, group.index
    n = unit_count(config, kind, b)
    if not 0 <= i < n:
        raise VitPruneError(f"{kind} index {i} out of range (0..{n - 1}) for {unit_key(kind, b)}")
    if kind == "emb":
        one = _idx([i])
        return [TensorSlice(name, dim, one) for name, dim in emb_axes(config)]
    p = f"blocks.{b}."
    cfg = config.blocks[b]
    bias = config.qkv_bias
    out: list[TensorSlice] = []

    def qkv(rows: Tensor) -> None:
        out.append(TensorSlice(p + "attn.qkv.weight", 0, rows))
        if bias:
            out.append(TensorSlice(p + "attn.qkv.bias", 0, rows))

    if kind == "heads":
        h = _idx([i])
        qkv(torch.cat([qkv_rows(cfg, "q", h), qkv_rows(cfg, "k", h), qkv_rows(cfg, "v", h)]))
        out.append(TensorSlice(p + "attn.proj.weight", 1, proj_cols(cfg, heads=h)))
    elif kind == "qk":
        j = _idx([i])
        qkv(torch.cat([qkv_rows(cfg, "q", dims=j), qkv_rows(cfg, "k", dims=j)]))
    elif kind == "v":
        j = _idx([i])
        qkv(qkv_rows(cfg, "v", dims=j))
        out.append(TensorSlice(p + "attn.proj.weight", 1, proj_cols(cfg, dims=j)))
    elif kind == "mlp":
        j = _idx([i])
        out += [TensorSlice(p + "mlp.fc1.weight", 0, j), TensorSlice(p + "mlp.fc1.bias", 0, j)]
        out.append(TensorSlice(p + "mlp.fc2.weight", 1, j))
    elif kind == "block":
        for name in block_param_names(config, b):
            size = _param_shape(config, name)[0]
            out.append(TensorSlice(name, 0, torch.arange(size)))
    return out


def _param_shape(config: ViTConfig, name: str) -> tuple[int, ...]:
    d = config.embed_dim
    parts = name.split(".")
    cfg = config.blocks[int(parts[1])]
    leaf = ".".join(parts[2:])
    inner_qk, inner_v = cfg.heads * cfg.qk_dim, cfg.heads * cfg.v_dim
    shapes = {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "attn.qkv.weight": (2 * inner_qk + inner_v, d),
        "attn.qkv.bias": (2 * inner_qk + inner_v,),
        "attn.proj.weight": (d, inner_v),
        "attn.proj.bias": (d,),
        "mlp.fc1.weight": (cfg.mlp_dim, d),
        "mlp.fc1.bias": (cfg.mlp_dim,),
        "mlp.fc2.weight": (d, cfg.mlp_dim),
        "mlp.fc2.bias": (d,),
    }
    return shapes[leaf]


def enumerate_groups(config: ViTConfig, kinds: Sequence[str] = KINDS) -> list[Group]:
    """All groups of the requested kinds: per block heads, qk, v, mlp, then emb, then whole blocks."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise VitPruneError(f"unknown group kind(s): {', '.join(bad)} (expected {', '.join(KINDS)})")
    groups: list[Group] = []
    for b in range(config.depth):
        for kind in BLOCK_UNIT_KINDS:
            if kind in kinds:
                groups += [Group(kind, b, i) for i in range(unit_count(config, kind, b))]
    if "emb" in kinds:
        groups += [Group("emb", None, c) for c in range(config.embed_dim)]
    if "block" in kinds:
        groups += [Group("block", b, 0) for b in range(config.depth)]
    return groups


@torch.no_grad()
def zero_group(model: torch.nn.Module, group: Group) -> None:
    """Set every weight that ``group`` removes to zero, in place (for brute-force loss-change checks)."""
    params = dict(model.named_parameters())
    for s in group_slices(model.config, group):
        params[s.name].index_fill_(s.dim, s.index.to(params[s.name].device), 0.0)
