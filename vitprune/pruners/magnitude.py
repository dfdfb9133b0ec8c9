"""Structural magnitude baselines through the one interface: L2 norm and first-order Taylor per group.

Each is its scores only (:mod:`vitprune.scoring.magnitude`); targets, selection, surgery, fine-tuning and the
report are :class:`~vitprune.pruners.base.StructuralPruner`'s. Defaults follow the common baselines:

- ``l2``: ``||w_S||_2`` of every QK / V / MLP unit, the same kept fraction in every block (``uniform``, as
  filter pruning and Torch-Pruning's default local scope), one scoring pass;
- ``taylor``: ``sum_S |g w|`` (Torch-Pruning's Taylor criterion) ranked globally (``greedy``), re-scored in
  ``prune_steps`` rounds (Torch-Pruning's ``iterative_steps``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vitprune.models.vit import ViT
from vitprune.pruners.base import Run
from vitprune.pruners.settings import setting
from vitprune.pruners.structural import StructuralConfig, StructuralPruner
from vitprune.scoring.magnitude import l2_group_scores, taylor_group_scores

MAGNITUDE_KINDS = ("heads", "qk", "v", "mlp", "emb")


@dataclass
class L2Config(StructuralConfig):
    kinds: tuple[str, ...] = setting(
        ("qk", "v", "mlp"), kind="strs", choices=MAGNITUDE_KINDS, help="structures that may be removed"
    )
    selection: str = setting("uniform", choices=("greedy", "threshold", "uniform"), help="global selection rule")


class L2Pruner(StructuralPruner):
    """Structural baseline: the L2 norm of each group's weights."""

    Config: ClassVar[type[L2Config]] = L2Config

    def scores(self, student: ViT, batches: Iterator, step: int, run: Run) -> dict[str, Tensor]:
        return l2_group_scores(student, self.config.kinds)


@dataclass
class TaylorConfig(StructuralConfig):
    kinds: tuple[str, ...] = setting(
        ("qk", "v", "mlp"), kind="strs", choices=MAGNITUDE_KINDS, help="structures that may be removed"
    )
    batches_per_step: int = setting(8, low=1, help="gradient batches averaged before each round")


class TaylorPruner(StructuralPruner):
    """Structural baseline: the first-order Taylor importance |g w| of each group."""

    Config: ClassVar[type[TaylorConfig]] = TaylorConfig

    def scores(self, student: ViT, batches: Iterator, step: int, run: Run) -> dict[str, Tensor]:
        return taylor_group_scores(student, batches, self.config.batches_per_step, self.config.kinds, run.device)


__all__ = ["L2Config", "L2Pruner", "TaylorConfig", "TaylorPruner"]
