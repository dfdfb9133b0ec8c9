"""Structural masks over a full model: which heads / QK dims / V dims / MLP neurons / channels / blocks stay.

:func:`apply_masks` sets them as the model's gates (buffers, see :mod:`vitprune.models.vit`), which makes the
full-size model compute exactly what the physically pruned model (:func:`vitprune.structures.surgery.prune_model`)
computes; :func:`architecture_after` gives that pruned model's :class:`ViTConfig`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.models.io import attach_gate
from vitprune.models.vit import GATE_NAMES, KIND_GATES
from vitprune.structures.groups import BLOCK_UNIT_KINDS, Group, parse_key, unit_count, unit_key

_FIELDS = BLOCK_UNIT_KINDS  # ("heads", "qk", "v", "mlp")


def _bools(n: int, value: bool = True) -> Tensor:
    return torch.full((n,), value, dtype=torch.bool)


@dataclass
class BlockMasks:
    """Keep-masks of one block (True = kept); ``keep=False`` removes the whole block."""

    heads: Tensor
    qk: Tensor
    v: Tensor
    mlp: Tensor
    keep: bool = True


@dataclass
class StructuralMasks:
    """Keep-masks of a whole model: a global ``emb`` mask and one :class:`BlockMasks` per block."""

    emb: Tensor
    blocks: list[BlockMasks]

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def all_kept(cls, config: ViTConfig) -> StructuralMasks:
        blocks = [
            BlockMasks(_bools(b.heads), _bools(b.qk_dim), _bools(b.v_dim), _bools(b.mlp_dim)) for b in config.blocks
        ]
        return cls(_bools(config.embed_dim), blocks)

    @classmethod
    def from_model(cls, model: nn.Module) -> StructuralMasks:
        """Read the gates on ``model``: a unit whose gate is exactly 0 is pruned, a block whose branch gates are
        both 0 is removed; absent gates keep everything."""
        masks = cls.all_kept(model.config)
        if model.emb_mask is not None:
            masks.emb = model.emb_mask.detach().cpu() != 0
        for bm, blk in zip(masks.blocks, model.blocks, strict=True):
            for name, (sub, gate) in KIND_GATES.items():
                value = getattr(getattr(blk, sub), gate)
                if value is not None:
                    setattr(bm, name, value.detach().cpu().reshape(-1) != 0)
            if blk.branch_gate is not None and bool((blk.branch_gate == 0).all()):
                bm.keep = False
        return masks

    def copy(self) -> StructuralMasks:
        return copy.deepcopy(self)

    # ----------------------------------------------------------------------------------------- access
    def items(self) -> Iterator[tuple[str, Tensor]]:
        """``(unit key, bool vector)`` for ``emb`` and every block's heads/qk/v/mlp (see ``groups.unit_key``)."""
        yield "emb", self.emb
        for b, bm in enumerate(self.blocks):
            for name in _FIELDS:
                yield unit_key(name, b), getattr(bm, name)

    def get(self, key: str) -> Tensor:
        kind, b = parse_key(key)
        if kind == "emb":
            return self.emb
        if kind == "block":
            return torch.tensor([self.blocks[b].keep])
        return getattr(self.blocks[b], kind)

    def is_kept(self, group: Group) -> bool:
        if group.kind == "block":
            return self.blocks[group.block].keep
        if group.kind != "emb" and not self.blocks[group.block].keep:
            return False
        return bool(self.get(group.key)[group.index])

    def remove(self, group: Group) -> None:
        """Mark ``group`` as pruned (in place)."""
        if group.kind == "block":
            self.blocks[group.block].keep = False
        else:
            self.get(group.key)[group.index] = False

    def validate(self, config: ViTConfig) -> None:
        """Raise :class:`VitPruneError` unless the masks fit ``config`` and keep at least one channel."""
        if len(self.blocks) != config.depth:
            raise VitPruneError(f"masks have {len(self.blocks)} blocks, model has {config.depth}")
        for key, mask in self.items():
            kind, b = parse_key(key)
            n = unit_count(config, kind, b)
            if mask.dtype != torch.bool or tuple(mask.shape) != (n,):
                raise VitPruneError(f"mask {key} must be a bool vector of length {n}, got {tuple(mask.shape)}")
        if not bool(self.emb.any()):
            raise VitPruneError("masks remove every embedding channel")

    def counts(self) -> dict[str, Any]:
        """Kept / total unit counts (JSON-friendly)."""
        return {key: [int(m.sum()), int(m.numel())] for key, m in self.items()} | {
            "blocks_kept": [sum(bm.keep for bm in self.blocks), len(self.blocks)]
        }

    # ----------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        def bits(m: Tensor) -> str:
            return "".join("1" if x else "0" for x in m.tolist())

        blocks = [{"keep": bm.keep} | {name: bits(getattr(bm, name)) for name in _FIELDS} for bm in self.blocks]
        return {"emb": bits(self.emb), "blocks": blocks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuralMasks:
        def unbits(s: str) -> Tensor:
            if not isinstance(s, str) or set(s) - {"0", "1"}:
                raise VitPruneError("mask strings must contain only 0 and 1")
            return torch.tensor([c == "1" for c in s], dtype=torch.bool)

        try:
            blocks = [
                BlockMasks(*(unbits(b[name]) for name in _FIELDS), keep=bool(b.get("keep", True)))
                for b in data["blocks"]
            ]
            return cls(unbits(data["emb"]), blocks)
        except (KeyError, TypeError) as exc:
            raise VitPruneError(f"invalid structural masks: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> StructuralMasks:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise VitPruneError(f"masks are not valid JSON: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StructuralMasks):
            return NotImplemented
        return self.to_dict() == other.to_dict()


# --------------------------------------------------------------------------------------------- model gates
def _set_gate(module: nn.Module, name: str, mask: Tensor, ref: Tensor) -> None:
    """Set a 0/1 buffer gate; a learnable gate (Parameter) is kept and multiplied by the mask instead."""
    current = module._parameters.get(name)
    value = mask.to(device=ref.device, dtype=ref.dtype)
    if current is not None:
        with torch.no_grad():
            current.mul_(value.view_as(current))
        return
    if bool(mask.all()):
        if name in module._buffers:
            module._buffers[name] = None
        return
    attach_gate(module, name, value)


def apply_masks(model: nn.Module, masks: StructuralMasks) -> nn.Module:
    """Make ``model`` compute the pruned architecture: set the vit.py gates from ``masks`` (in place).

    Buffers are 0/1 (``attn.head_gate``/``qk_gate``/``v_gate``, ``mlp.gate``, ``branch_gate = [0, 0]`` for a
    removed block, ``emb_mask``); an existing *learnable* gate is multiplied by the mask and stays learnable.
    Gates whose mask keeps everything are cleared (buffers only).
    """
    masks.validate(model.config)
    ref = model.pos_embed
    _set_gate(model, "emb_mask", masks.emb, ref)
    for bm, blk in zip(masks.blocks, model.blocks, strict=True):
        for name, (sub, gate) in KIND_GATES.items():
            _set_gate(getattr(blk, sub), gate, getattr(bm, name), ref)
        _set_gate(blk, "branch_gate", torch.tensor([bm.keep, bm.keep]), ref)
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Clear every gate *buffer* (learnable gate parameters are left alone)."""
    modules = [model] + [m for blk in model.blocks for m in (blk, blk.attn, blk.mlp)]
    for module in modules:
        for name in GATE_NAMES:
            if name in module._buffers:
                module._buffers[name] = None
    return model


# --------------------------------------------------------------------------------------------- architecture
def effective_block(bm: BlockMasks, cfg: BlockConfig) -> tuple[int, int, int, int]:
    """(heads, qk, v, mlp) kept by ``bm``; attention with no head or no V dim left collapses to 0/0/0."""
    heads, qk, v, mlp = (int(getattr(bm, f).sum()) for f in _FIELDS)
    if heads == 0 or v == 0:
        heads = qk = v = 0
    return heads, qk, v, mlp


def architecture_after(config: ViTConfig, masks: StructuralMasks) -> ViTConfig:
    """The :class:`ViTConfig` of the pruned model (removed blocks dropped, ORIGINAL attention scales kept)."""
    masks.validate(config)
    blocks = []
    for bm, cfg in zip(masks.blocks, config.blocks, strict=True):
        if bm.keep:
            h, q, v, m = effective_block(bm, cfg)
            blocks.append(BlockConfig(h, q, v, m, scale=cfg.scale))
    return replace(config, embed_dim=int(masks.emb.sum()), blocks=blocks, extra=copy.deepcopy(config.extra))


# --------------------------------------------------------------------------------------------- helpers
def _keep_top(n: int, keep: int, scores: Tensor | None) -> Tensor:
    mask = _bools(n, False)
    if keep <= 0:
        return mask
    order = torch.arange(n) if scores is None else torch.argsort(scores.detach().cpu().float(), descending=True)
    mask[order[: min(keep, n)]] = True
    return mask


def uniform_masks(
    config: ViTConfig,
    heads: float = 1.0,
    qk: float = 1.0,
    v: float = 1.0,
    mlp: float = 1.0,
    emb: float = 1.0,
    scores: dict[str, Tensor] | None = None,
) -> StructuralMasks:
    """Keep the same fraction of each kind in every block (rounded up); the highest ``scores`` (keyed by
    ``groups.unit_key``) win, else the first units."""
    scores = scores or {}
    out = StructuralMasks.all_kept(config)
    out.emb = _keep_top(config.embed_dim, math.ceil(emb * config.embed_dim), scores.get("emb"))
    fractions = {"heads": heads, "qk": qk, "v": v, "mlp": mlp}
    for b, bm in enumerate(out.blocks):
        for name in _FIELDS:
            n = unit_count(config, name, b)
            setattr(bm, name, _keep_top(n, math.ceil(fractions[name] * n), scores.get(unit_key(name, b))))
    return out


def random_masks(
    config: ViTConfig, generator: torch.Generator, p: float = 0.3, p_block: float = 0.0
) -> StructuralMasks:
    """Each unit pruned with probability ``p`` (at least one channel kept), each block with ``p_block``."""
    out = StructuralMasks.all_kept(config)
    for _key, mask in list(out.items()):
        mask.copy_(torch.rand(mask.shape, generator=generator) >= p)
    if not bool(out.emb.any()):
        out.emb[0] = True
    for bm in out.blocks:
        bm.keep = bool(torch.rand((), generator=generator) >= p_block)
    return out
