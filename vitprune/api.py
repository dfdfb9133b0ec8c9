"""The Python API in a few lines: ``vitprune.prune(model, "nvit", data=loader, target_macs=0.5)``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vitprune.pruners.base import EvalFn, PruneResult


def prune(
    model: nn.Module,
    method: str | list[tuple[str, dict[str, Any]]],
    data: Any,
    *,
    teacher: nn.Module | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str | torch.device = "cpu",
    eval_fn: EvalFn | None = None,
    **settings: Any,
) -> PruneResult | list[PruneResult]:
    """Prune ``model`` with a registered ``method`` (``vitprune.pruners.available()``) and its ``settings``.

    ``method`` may also be a list of ``(method, settings)`` stages (:class:`~vitprune.pruners.compose.Pipeline`).
    ``data``: a loader of ``(images, labels)`` batches, or :class:`~vitprune.pruners.base.PruneData` (separate
    calibration and training loaders). ``teacher`` (distillation) defaults to ``model``. With ``out`` the run is
    resumable there (``resume=True``) and its outputs are written by the one output writer (``model/``,
    ``masks``, ``report.json``). Returns a :class:`PruneResult` (a list for a sweep of sparsities).
    """
    from vitprune.pruners import create
    from vitprune.pruners.compose import Pipeline
    from vitprune.pruners.output import prepare_run_dir, write_results

    pruner = Pipeline(method) if isinstance(method, list) else create(method, **settings)
    if out is not None:
        prepare_run_dir(out, overwrite=overwrite, resume=resume)
    result = pruner.prune(model, data, teacher, workdir=out, resume=resume, device=device, eval_fn=eval_fn)
    if out is not None:
        write_results(result, out, dense_config=getattr(model, "config", None))
    return result


__all__ = ["prune"]
