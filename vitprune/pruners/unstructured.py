"""Unstructured pruning: one sparsify pass for a sweep of sparsity targets, then optional masked fine-tuning."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.pruners.base import (
    EvalFn,
    Pruner,
    PrunerConfig,
    PruneResult,
    as_data,
    jsonable,
    restore_flags,
    run_eval,
    workdir_path,
)
from vitprune.pruners.calibration import DEFAULT_PATTERNS
from vitprune.pruners.settings import setting


@dataclass
class UnstructuredConfig(PrunerConfig):
    """Sparsity targets (a sweep) and N:M, shared by every unstructured method."""

    sparsity: tuple[float, ...] = setting(
        (),
        kind="floats",
        nargs="+",
        low=0.0,
        high=1.0,
        high_open=True,
        nullable=True,
        help="target sparsities, e.g. 0.5 0.6 0.7",
    )
    nm: str | None = setting(None, kind="str", nullable=True, metavar="N:M", help="keep N of every M inputs (2:4)")
    patterns: tuple[str, ...] = setting(
        DEFAULT_PATTERNS, kind="strs", help="prunable linears (fnmatch patterns of module names)"
    )

    def normalize(self) -> None:
        if isinstance(self.nm, (tuple, list)):  # the library's (N, M) form
            self.nm = f"{int(self.nm[0])}:{int(self.nm[1])}"

    def check(self) -> None:
        from vitprune.pruners.calibration import parse_nm

        parse_nm(self.nm)

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        from vitprune.pruners.calibration import parse_nm

        return parse_nm(self.nm)

    @property
    def targets(self) -> list[float]:
        nm = self.nm_pair
        return [(nm[1] - nm[0]) / nm[1]] if nm is not None else [float(s) for s in self.sparsity]


class UnstructuredPruner(Pruner):
    """One sparsify pass for every target of the sweep, then optional masked fine-tuning of each result."""

    kind = "unstructured"
    Config: ClassVar[type[UnstructuredConfig]] = UnstructuredConfig

    def sparsify(self, model: nn.Module, calib: Iterable | None, device: torch.device) -> dict[float, Any]:
        """``{target: SparsePruneResult}`` for every target of the config (pruned copies; ``model`` unchanged)."""
        raise NotImplementedError

    def check(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        from vitprune.pruners.calibration import find_linears

        if self.config.nm is None and not self.config.sparsity:
            raise VitPruneError("give --sparsity (one or more targets) or --nm")
        linears = find_linears(model, self.config.patterns)
        if not linears:
            raise VitPruneError(f"no prunable linear layers match {', '.join(self.config.patterns)}")
        nm = self.config.nm_pair
        if nm is not None:
            for name, lin in linears.items():
                if lin.in_features % nm[1]:
                    raise VitPruneError(
                        f"N:M {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; {name} has {lin.in_features}"
                    )

    def prune(
        self,
        model: nn.Module,
        data: Any,
        teacher: nn.Module | None = None,
        *,
        workdir: str | Path | None = None,
        resume: bool = False,
        device: str | torch.device = "cpu",
        eval_fn: EvalFn | None = None,
    ) -> list[PruneResult]:
        device = torch.device(device)
        self.check(model, device)
        restore = restore_flags(model)
        try:
            return self._prune(model, as_data(data), teacher, workdir_path(workdir), resume, device, eval_fn)
        finally:
            restore()

    def _prune(self, model, data, teacher, work, resume, device, eval_fn) -> list[PruneResult]:
        t0 = time.perf_counter()
        dense_eval = run_eval(eval_fn, model)
        results = self.sparsify(model, data.calib, device)
        out = []
        teacher = teacher if teacher is not None else model
        for target, res in results.items():
            report = {"method": self.name, "label": self.label, "type": self.kind, "paper": self.paper}
            report["settings"] = self.config.to_dict()
            report |= dict(res.report)
            if dense_eval is not None:
                report["dense_eval"] = dense_eval
                report["eval"] = run_eval(eval_fn, res.model)
            sub = work / f"finetune-s{target:.2f}" if work is not None else None
            ft = self._finetune(res.model, data, teacher, sub, resume, device, masks=res.masks)
            if ft is not None:
                report["finetune"] = ft
                report["before_finetune_eval"] = report.pop("eval", None)
                if eval_fn is not None:
                    report["eval"] = run_eval(eval_fn, res.model)
            res.model.eval()
            report["time_s"] = round(time.perf_counter() - t0, 2)
            out.append(PruneResult(res.model, res.masks, jsonable(report), target))
        return out


__all__ = ["UnstructuredConfig", "UnstructuredPruner"]
