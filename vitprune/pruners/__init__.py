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

# name -> "module:Class" (imported on first use, so listing the methods stays cheap)
REGISTRY: dict[str, str] = {
    "nvit": "vitprune.pruners.nvit:NViTPruner",
    "vtp": "vitprune.pruners.vtp:VTPPruner",
    "l2": "vitprune.pruners.magnitude:L2Pruner",
    "taylor": "vitprune.pruners.magnitude:TaylorPruner",
    "obs": "vitprune.pruners.obs:OBSPruner",
    "gm": "vitprune.pruners.baselines:GlobalMagnitudePruner",
    "um": "vitprune.pruners.baselines:UniformMagnitudePruner",
    "wanda": "vitprune.pruners.baselines:WandaPruner",
    "sparsegpt": "vitprune.pruners.baselines:SparseGPTPruner",
}


def available(kind: str | None = None) -> list[str]:
    """Registered method names (optionally only ``"structural"`` or ``"unstructured"`` ones), in registry order."""
    if kind is None:
        return list(REGISTRY)
    return [n for n in REGISTRY if get(n).kind == kind]


def get(name: str) -> type[Pruner]:
    """The pruner class registered as ``name``."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise VitPruneError(f"unknown pruning method {name!r} (available: {', '.join(REGISTRY)})") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, **settings) -> Pruner:
    """``get(name)(**settings)``: a configured pruner."""
    return get(name)(**settings)


__all__ = ["REGISTRY", "PruneData", "PruneResult", "Pruner", "available", "create", "get"]
