"""Pruning methods behind one interface (:mod:`vitprune.pruners.base`) and one registry.

``get(name)`` returns a method's :class:`~vitprune.pruners.base.Pruner` class, ``available()`` lists the names;
the CLI, recipes, demo and benchmarks read this registry instead of lists of their own. Adding a method = one
module with a :class:`~vitprune.pruners.base.StructuralPruner` (scores) or
:class:`~vitprune.pruners.base.UnstructuredPruner` (sparsify) subclass + one line in ``REGISTRY`` + tests.
"""

from __future__ import annotations

import importlib

from vitprune.errors import VitPruneError
from vitprune.pruners.base import PruneData, Pruner, PruneResult

# name -> ("module:Class", label in tables and plots, paper); the class is imported on first use
REGISTRY: dict[str, tuple[str, str, str]] = {
    "nvit": (
        "vitprune.pruners.nvit:NViTPruner",
        "NViT",
        "Yang et al. 2023, Global Vision Transformer Pruning with Hessian-Aware Saliency (NViT)",
    ),
    "vtp": (
        "vitprune.pruners.vtp:VTPPruner",
        "VTP",
        "Zhu, Tang & Han 2021, Vision Transformer Pruning (L1-regularised dimension gates)",
    ),
    "l2": (
        "vitprune.pruners.magnitude:L2Pruner",
        "L2 magnitude",
        "Li et al. 2017, Pruning Filters for Efficient ConvNets (L2 norm of each group's weights)",
    ),
    "taylor": (
        "vitprune.pruners.magnitude:TaylorPruner",
        "Taylor",
        "Molchanov et al. 2019, Importance Estimation for Neural Network Pruning (|g w| per group)",
    ),
    "obs": (
        "vitprune.pruners.obs:OBSPruner",
        "oViT/OBS",
        "Kuznedelev et al. 2023, oViT / CAP: correlation-aware second-order (OBS) pruning of ViTs",
    ),
    "gm": (
        "vitprune.pruners.baselines:GlobalMagnitudePruner",
        "global magnitude",
        "Han et al. 2015 (one |w| threshold)",
    ),
    "um": (
        "vitprune.pruners.baselines:UniformMagnitudePruner",
        "uniform magnitude",
        "Zhu & Gupta 2017 (|w| per layer)",
    ),
    "wanda": ("vitprune.pruners.baselines:WandaPruner", "Wanda", "Sun et al. 2023, Wanda (eq. 1: |W| * ||X||)"),
    "sparsegpt": ("vitprune.pruners.baselines:SparseGPTPruner", "SparseGPT", "Frantar & Alistarh 2023, Algorithm 1"),
}


def available(kind: str | None = None) -> list[str]:
    """Registered method names (optionally only ``"structural"`` or ``"unstructured"`` ones), in registry order."""
    if kind is None:
        return list(REGISTRY)
    return [n for n in REGISTRY if get(n).kind == kind]


def get(name: str) -> type[Pruner]:
    """The pruner class registered as ``name``."""
    try:
        target = REGISTRY[name][0]
    except KeyError:
        raise VitPruneError(f"unknown pruning method {name!r} (available: {', '.join(REGISTRY)})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, **settings) -> Pruner:
    """``get(name)(**settings)``: a configured pruner."""
    return get(name)(**settings)


__all__ = ["REGISTRY", "PruneData", "PruneResult", "Pruner", "available", "create", "get"]
