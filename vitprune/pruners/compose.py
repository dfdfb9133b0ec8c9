"""Composition: stages of pruners run one after the other, each with its own recovery, reported together.

The papers call their methods complementary (NViT's structures, then oViT's unstructured sparsity of what
remains); ``Pipeline([("nvit", {...}), ("obs", {...})]).prune(model, data)`` runs stage 1 on the dense model,
stage 2 on stage 1's result, and so on. The dense model stays the teacher of every stage. Only the last stage may
be a sweep (several targets). The result is the last stage's, with every stage's report in ``report["stages"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.pruners.base import Pruner, PruneResult


class Pipeline:
    """Stages given as ``(method, settings)`` pairs or configured :class:`Pruner` objects."""

    name = "pipeline"

    def __init__(self, stages: list[tuple[str, dict[str, Any]] | Pruner]) -> None:
        from vitprune.pruners import create

        if not stages:
            raise VitPruneError("a pipeline needs at least one stage")
        self.stages: list[Pruner] = [s if isinstance(s, Pruner) else create(s[0], **dict(s[1])) for s in stages]

    @property
    def kind(self) -> str:
        return self.stages[-1].kind

    def check(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        """Check the first stage against ``model`` (later stages see a model that does not exist yet)."""
        self.stages[0].check(model, device)

    def calibration_images(self) -> int | None:
        counts = [n for n in (s.calibration_images() for s in self.stages) if n is not None]
        return max(counts) if counts else None

    def prune(self, model: nn.Module, data: Any, teacher: nn.Module | None = None, **run: Any) -> Any:
        """Every stage in turn (``run``: the keywords of :meth:`Pruner.prune`; ``workdir`` gets one sub-folder
        per stage); returns the last stage's result(s) with the earlier reports in ``report["stages"]``."""
        teacher = teacher if teacher is not None else model
        current, reports = model, []
        result: PruneResult | list[PruneResult] | None = None
        workdir = run.pop("workdir", None)
        for i, stage in enumerate(self.stages):
            sub = Path(workdir) / "stages" / f"{i + 1}-{stage.name}" if workdir is not None else None
            result = stage.prune(current, data, teacher, workdir=sub, **run)
            last = i == len(self.stages) - 1
            if isinstance(result, list):
                if len(result) != 1 and not last:
                    raise VitPruneError(f"stage {i + 1} ({stage.name}) is a sweep: only the last stage may be one")
                reports.append([r.report for r in result] if last else result[0].report)
                if not last:
                    result = result[0]
            else:
                reports.append(result.report)
            current = result.model if isinstance(result, PruneResult) else current
        for res in result if isinstance(result, list) else [result]:
            res.report = dict(res.report) | {"pipeline": [s.name for s in self.stages], "stages": reports[:-1]}
        return result


__all__ = ["Pipeline"]
