"""Model surgery: build the physically smaller ViT that a masked (gated) full model computes.

The pruned model is a plain :class:`~vitprune.models.ViT` with per-block dims and the ORIGINAL attention scales
(METHODS.md section 1). Gates present on the source model are folded into the kept weights, so learnable
(non-binary) VTP gates disappear without changing the outputs:

- ``attn.qk_gate[j]`` scales the q rows of dim j (weights and biases) in every head;
- ``attn.v_gate[j]`` scales the v rows of dim j in every head;
- ``attn.head_gate[h]`` scales the ``proj`` input columns of head h;
- ``mlp.gate[j]`` scales ``fc2`` column j;
- ``branch_gate`` scales ``proj`` (weight and bias) and ``fc2`` (weight and bias);
- ``emb_mask`` must be 0/1 (LayerNorm statistics depend on it); its zeros are removed channels.

A unit whose gate is exactly 0 is removed as well as the units ``masks`` removes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.models.vit import GATE_NAMES, ViT
from vitprune.structures.groups import proj_cols, qkv_rows, unit_key
from vitprune.structures.masks import StructuralMasks, architecture_after, effective_block


def _and(a: StructuralMasks, b: StructuralMasks) -> StructuralMasks:
    out = a.copy()
    for (_, ma), (_, mb) in zip(out.items(), b.items(), strict=True):
        ma &= mb
    for x, y in zip(out.blocks, b.blocks, strict=True):
        x.keep = x.keep and y.keep
    return out


def _normalise(masks: StructuralMasks, config) -> StructuralMasks:
    """Clear heads/qk/v masks of blocks whose attention collapses (no head or no V dim left)."""
    out = masks.copy()
    for bm, cfg in zip(out.blocks, config.blocks, strict=True):
        if effective_block(bm, cfg)[0] == 0:
            bm.heads[:] = False
            bm.qk[:] = False
            bm.v[:] = False
    return out


def round_masks(
    config, masks: StructuralMasks, multiple: int, scores: dict[str, Tensor] | None = None
) -> tuple[StructuralMasks, dict[str, Any]]:
    """Round every kept QK / V / MLP / embedding width UP to a multiple of ``multiple`` (capped at the full width)
    by re-keeping the best-scored removed units (``scores`` keyed by ``groups.unit_key``; without scores the
    lowest indices). Heads are not rounded; a fully removed dim stays 0. Returns the masks and a report."""
    if multiple < 1:
        raise VitPruneError(f"round_to must be a positive integer, got {multiple}")
    scores = scores or {}
    out = _normalise(masks, config)
    report: dict[str, Any] = {"multiple": multiple, "added": {}}
    keys = ["emb"] + [unit_key(kind, b) for b, bm in enumerate(out.blocks) if bm.keep for kind in ("qk", "v", "mlp")]
    for key in keys:
        mask = out.get(key)
        kept, n = int(mask.sum()), mask.numel()
        if kept == 0 or kept % multiple == 0 or kept == n:
            continue
        want = min(n, math.ceil(kept / multiple) * multiple)
        score = scores.get(key)
        score = torch.arange(n, 0, -1, dtype=torch.float) if score is None else score.detach().cpu().float().clone()
        score[mask] = -math.inf
        extra = torch.argsort(score, descending=True)[: want - kept]
        mask[extra] = True
        report["added"][key] = {"before": kept, "after": want, "units": sorted(extra.tolist())}
    return out, report


def resolve_masks(
    model: ViT,
    masks: StructuralMasks | None = None,
    round_to: int | None = None,
    scores: dict[str, Tensor] | None = None,
) -> tuple[StructuralMasks, dict[str, Any] | None]:
    """The masks surgery applies to ``model``: ``masks`` AND the model's own gates, normalised (an attention
    with no head or V dim left is removed whole), then rounded up to ``round_to`` (best ``scores`` first).
    Returns (masks, rounding report or None)."""
    config = model.config
    gated = StructuralMasks.from_model(model)
    masks = gated if masks is None else _and(masks, gated)
    masks.validate(config)
    if model.emb_mask is not None and not bool(((model.emb_mask == 0) | (model.emb_mask == 1)).all()):
        raise VitPruneError("emb_mask must be a 0/1 mask to fold (LayerNorm statistics depend on it)")
    masks = _normalise(masks, config)
    rounding = None
    if round_to:
        masks, rounding = round_masks(config, masks, round_to, scores)
    return masks, rounding


def prune_model(
    model: ViT,
    masks: StructuralMasks | None = None,
    round_to: int | None = None,
    scores: dict[str, Tensor] | None = None,
) -> ViT:
    """The physically smaller ViT computing what ``model`` with ``masks`` applied computes (see module doc)."""
    return prune_model_with_report(model, masks, round_to=round_to, scores=scores)[0]


@torch.no_grad()
def prune_model_with_report(
    model: ViT,
    masks: StructuralMasks | None = None,
    round_to: int | None = None,
    scores: dict[str, Tensor] | None = None,
) -> tuple[ViT, dict[str, Any]]:
    """:func:`prune_model` plus a report (kept counts, rounding additions)."""
    config = model.config
    masks, rounding = resolve_masks(model, masks, round_to, scores)
    report: dict[str, Any] = {"rounding": rounding}
    new_config = architecture_after(config, masks)
    ref = model.pos_embed
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in _GATES}
    e = torch.nonzero(masks.emb).flatten().to(ref.device)
    new: dict[str, Tensor] = {}

    def take(name: str, dim: int, idx: Tensor, out_name: str | None = None) -> None:
        new[out_name or name] = state[name].index_select(dim, idx.to(ref.device))

    take("patch_embed.proj.weight", 0, e)
    take("patch_embed.proj.bias", 0, e)
    for tok in ("cls_token", "dist_token"):
        if tok in state:
            take(tok, 2, e)
    take("pos_embed", 2, e)
    take("norm.weight", 0, e)
    take("norm.bias", 0, e)
    for head in ("head", "head_dist"):
        if f"{head}.weight" in state:
            take(f"{head}.weight", 1, e)
            new[f"{head}.bias"] = state[f"{head}.bias"]

    nb = 0
    for b, (bm, cfg, blk) in enumerate(zip(masks.blocks, config.blocks, model.blocks, strict=True)):
        if not bm.keep:
            continue
        src, dst = f"blocks.{b}.", f"blocks.{nb}."
        nb += 1
        for leaf in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            take(src + leaf, 0, e, dst + leaf)
        branch = blk.branch_gate if blk.branch_gate is not None else torch.ones(2, device=ref.device)

        # attention: fold qk_gate into q rows, v_gate into v rows, head_gate and branch_gate[0] into proj
        hk, jq, jv = (torch.nonzero(getattr(bm, f)).flatten() for f in ("heads", "qk", "v"))
        qkv_w = state[src + "attn.qkv.weight"].clone()
        qkv_b = state[src + "attn.qkv.bias"].clone() if config.qkv_bias else None
        row_scale = torch.ones(qkv_w.shape[0], device=ref.device, dtype=ref.dtype)
        if blk.attn.qk_gate is not None and cfg.heads:
            row_scale[qkv_rows(cfg, "q")] = blk.attn.qk_gate.detach().reshape(-1).repeat(cfg.heads)
        if blk.attn.v_gate is not None and cfg.heads:
            row_scale[qkv_rows(cfg, "v")] = blk.attn.v_gate.detach().reshape(-1).repeat(cfg.heads)
        qkv_w *= row_scale[:, None]
        if qkv_b is not None:
            qkv_b *= row_scale
        rows = torch.cat([qkv_rows(cfg, "q", hk, jq), qkv_rows(cfg, "k", hk, jq), qkv_rows(cfg, "v", hk, jv)])
        rows = rows.to(ref.device)
        new[dst + "attn.qkv.weight"] = qkv_w.index_select(0, rows).index_select(1, e)
        if qkv_b is not None:
            new[dst + "attn.qkv.bias"] = qkv_b.index_select(0, rows)
        proj_w = state[src + "attn.proj.weight"] * branch[0]
        if blk.attn.head_gate is not None and cfg.heads:
            proj_w = proj_w * blk.attn.head_gate.detach().reshape(-1).repeat_interleave(cfg.v_dim)
        cols = proj_cols(cfg, hk, jv).to(ref.device)
        new[dst + "attn.proj.weight"] = proj_w.index_select(0, e).index_select(1, cols)
        new[dst + "attn.proj.bias"] = (state[src + "attn.proj.bias"] * branch[0]).index_select(0, e)

        # MLP: fold mlp.gate and branch_gate[1] into fc2
        m = torch.nonzero(bm.mlp).flatten().to(ref.device)
        take(src + "mlp.fc1.weight", 0, m, dst + "mlp.fc1.weight")
        new[dst + "mlp.fc1.weight"] = new[dst + "mlp.fc1.weight"].index_select(1, e)
        take(src + "mlp.fc1.bias", 0, m, dst + "mlp.fc1.bias")
        fc2_w = state[src + "mlp.fc2.weight"] * branch[1]
        if blk.mlp.gate is not None:
            fc2_w = fc2_w * blk.mlp.gate.detach().reshape(-1)
        new[dst + "mlp.fc2.weight"] = fc2_w.index_select(0, e).index_select(1, m)
        new[dst + "mlp.fc2.bias"] = (state[src + "mlp.fc2.bias"] * branch[1]).index_select(0, e)

    pruned = ViT(new_config).to(device=ref.device, dtype=ref.dtype)
    pruned.load_state_dict(new, strict=True)
    pruned.train(model.training)
    report["masks"] = masks.counts()
    report["config"] = new_config.to_dict()
    return pruned, report


_GATES = set(GATE_NAMES)
