"""Counting what pruning removed: prunable weights, exact zeros, and sparsity against the dense model.

The prunable weights are the qkv / proj / fc1 / fc2 weights of the blocks (the linears every unstructured method
prunes, :data:`vitprune.pruners.calibration.DEFAULT_PATTERNS`); structural pruning removes some of them, unstructured
pruning sets them to exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitprune.metrics.flops import count_params
from vitprune.pruners.calibration import DEFAULT_PATTERNS, find_linears


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Parameter names of the prunable linear weights."""
    return [f"{n}.weight" for n in find_linears(model, DEFAULT_PATTERNS)]


def prunable_weights(model: nn.Module) -> int:
    """Number of prunable weight elements (the sparsity denominator)."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in prunable_weight_names(model))


@torch.no_grad()
def zero_counts(model: nn.Module) -> dict[str, Any]:
    """Exact zeros over the prunable weights: ``{"zeros", "weights", "sparsity"}``."""
    params = dict(model.named_parameters())
    names = prunable_weight_names(model)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    return {"zeros": zeros, "weights": total, "sparsity": zeros / total if total else 0.0}


def nonzero_params(model: nn.Module) -> int:
    """Architecture parameters minus the exactly-zero entries of the prunable weights."""
    return count_params(model.config) - zero_counts(model)["zeros"]


def sparsity_vs_dense(model: nn.Module, dense_prunable: int) -> float:
    """Share of the dense model's prunable weights that are gone: removed by surgery or exactly zero."""
    counts = zero_counts(model)
    return 1.0 - (counts["weights"] - counts["zeros"]) / dense_prunable


__all__ = ["nonzero_params", "prunable_weight_names", "prunable_weights", "sparsity_vs_dense", "zero_counts"]
