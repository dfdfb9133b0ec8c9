"""Magnitude scores of structural groups: L2 norm (filter pruning) and first-order Taylor ``|g * w|``.

A group's elements are those :func:`vitprune.structures.groups.group_slices` lists (METHODS.md section 1: a QK
dim is row j of q and of k in every head, with biases; an MLP neuron is fc1 row j, its bias and fc2 column j;
...). Scores are keyed by :func:`~vitprune.structures.groups.unit_key`, like the NViT saliency, so every
selection rule in :mod:`vitprune.pruners.selection` takes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.models.vit import GATE_NAMES, ViT
from vitprune.scoring.hessian import saliency_loss
from vitprune.structures.groups import Group, group_slices, unit_count, unit_key


@torch.no_grad()
def group_sums(model: ViT, kinds: Sequence[str], values: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sum_{i in S} values[i]`` (float64) for every unit ``S`` of ``kinds`` (``values`` by parameter name)."""
    config = model.config
    out: dict[str, Tensor] = {}
    for kind in kinds:
        for b in [None] if kind == "emb" else list(range(config.depth)):
            n = unit_count(config, kind, b)
            acc = torch.zeros(n, dtype=torch.float64)
            for i in range(n):
                for s in group_slices(config, Group(kind, b, i)):
                    v = values[s.name]
                    acc[i] += v.index_select(s.dim, s.index.to(v.device)).sum().cpu()
            out[unit_key(kind, b)] = acc
    return out


@torch.no_grad()
def l2_group_scores(model: ViT, kinds: Sequence[str] = ("qk", "v", "mlp")) -> dict[str, Tensor]:
    """``||w_S||_2`` over every element a unit's removal deletes (the magnitude criterion of filter pruning,
    Li et al. 2017, applied to the NViT/VTP groups)."""
    squares = {n: p.detach().double().pow(2) for n, p in model.named_parameters()}
    return {k: v.sqrt().float() for k, v in group_sums(model, kinds, squares).items()}


def taylor_group_scores(
    model: ViT,
    batches: Iterator,
    num_batches: int,
    kinds: Sequence[str] = ("qk", "v", "mlp"),
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """First-order Taylor importance ``sum_{i in S} |g_i w_i|`` with ``g`` the loss gradient averaged over
    ``num_batches`` batches (Molchanov et al. 2019; Torch-Pruning's ``TaylorImportance`` on the same groups).
    Batches without labels use the model's own predictions as labels."""
    was = model.training
    model.eval()
    names = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in GATE_NAMES and p.requires_grad]
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            x, y = (batch, None) if isinstance(batch, Tensor) else (batch[0], batch[1] if len(batch) > 1 else None)
            x = x.to(device)
            if y is None:
                with torch.no_grad():
                    y = model(x).argmax(-1)
            loss = saliency_loss(model, x, y.to(device), "labels")
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    total[n] += g.double()
            seen += 1
    finally:
        model.train(was)
    if seen == 0:
        raise VitPruneError("no batches for the Taylor scores (empty data loader?)")
    values = {n: (total[n] / seen * params[n].detach().double()).abs() for n in names}
    return {k: v.float() for k, v in group_sums(model, kinds, values).items()}


__all__ = ["group_sums", "l2_group_scores", "taylor_group_scores"]
