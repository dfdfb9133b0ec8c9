"""Unstructured pruning: one sparsify pass for a sweep of sparsity targets, then optional masked fine-tuning."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.pruners.base import Pruner, PrunerConfig, PruneResult, Run, jsonable
from vitprune.pruners.calibration import DEFAULT_PATTERNS
from vitprune.pruners.settings import SPARSITIES, setting


@dataclass
class UnstructuredConfig(PrunerConfig):
    """Sparsity targets (a sweep) and N:M, shared by every unstructured method."""

    sparsity: tuple[float, ...] = setting((), help="target sparsities, e.g. 0.5 0.6 0.7", **SPARSITIES)
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

    def sparsify(self, model: nn.Module, run: Run) -> dict[float, Any]:
        """``{target: SparsePruneResult}`` for every target of the config (pruned copies; ``model`` unchanged),
        calibrated on ``run.data.calib``."""
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

    def header(self) -> dict[str, Any]:
        """The report entries every result of this method starts with."""
        return {"method": self.name, "label": self.label, "type": self.kind, "paper": self.paper,
                "settings": self.config.to_dict()}  # fmt: skip

    def _reconstruct(self, dense: nn.Module, res: Any, run: Run) -> dict[str, Any]:
        """Re-solve the kept weights of every masked row against the dense outputs (the mask itself is kept)."""
        from vitprune.pruners.reconstruct import reconstruct_unstructured

        cfg = self.config
        out: dict[str, Any] = {}
        if run.eval_fn is not None:
            out["before_reconstruction_eval"] = run.eval(res.model)
        _, out["reconstruction"] = reconstruct_unstructured(
            dense, res.model, res.masks, run.data.calib, num_images=cfg.reconstruct_images,
            damping=cfg.reconstruct_damping, sequential=cfg.reconstruct == "sequential",
            target=cfg.reconstruct_target or "layer", device=run.device,
        )  # fmt: skip
        return out

    def run(self, model: nn.Module, run: Run) -> list[PruneResult]:
        t0 = time.perf_counter()
        dense_eval = run.eval(model)
        results = self.sparsify(model, run)
        out = []
        for target, res in results.items():
            report = self.header() | dict(res.report)
            if self.config.reconstruct != "off":
                report |= self._reconstruct(model, res, run)
            if dense_eval is not None:
                report["dense_eval"] = dense_eval
                report["eval"] = run.eval(res.model)
            ft = self._finetune(res.model, run, f"finetune-s{target:.2f}", masks=res.masks)
            if ft is not None:
                report["finetune"] = ft
                report["before_finetune_eval"] = report.pop("eval", None)
                if run.eval_fn is not None:
                    report["eval"] = run.eval(res.model)
            res.model.eval()
            report["time_s"] = round(time.perf_counter() - t0, 2)
            out.append(PruneResult(res.model, res.masks, jsonable(report), target))
        return out


__all__ = ["UnstructuredConfig", "UnstructuredPruner"]
