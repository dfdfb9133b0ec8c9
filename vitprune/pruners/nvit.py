"""NViT: iterative global structural pruning of a ViT with Hessian-aware saliency (Yang et al., CVPR 2023).

Algorithm (METHODS.md section 2; NViT Sec. 3):

1. every prunable unit of the model - attention heads, QK dims, V dims (aligned across heads), MLP neurons of
   every block, embedding channels, optionally whole blocks - gets the saliency
   ``I(S) = 1/2 E_batch[(sum_{i in S} g_i w_i)^2]`` (:mod:`vitprune.scoring.hessian`), accumulated over
   ``batches_per_step`` batches;
2. the lowest-scored units of each (block, kind) are grouped in chunks (EMB 16, head 1, QK 8, V 8, MLP 16 by
   default, the NViT code's hardware-friendly sizes; a chunk scores the sum of its units), and ALL chunks of
   all kinds and blocks are ranked in ONE list by ``I(S)`` - or ``I(S) - eta * dLat(S)`` with a latency lookup
   table (NViT's latency-aware regularisation; an embedding chunk saves latency in every block);
3. chunks are removed (as structural masks on the model) from the bottom of the list until this step's share
   of the target is met; ``prune_steps`` such steps reach the target (MACs / params / LUT latency fraction),
   optionally with distillation training from the dense model between steps;
4. the physically smaller model is built (surgery), optionally with dims rounded up to multiples of 8, and
   fine-tuned with distillation.

Here NViT is its scores only: :meth:`NViTPruner.scores` (the Hessian saliency of the current masked model);
targets, the global greedy selection (:mod:`vitprune.pruners.selection`), rounds, surgery, fine-tuning, report
and resume are :class:`~vitprune.pruners.base.StructuralPruner`'s. ``NViTPruner(target_macs=0.5, ...).prune(model,
loader)`` returns a :class:`~vitprune.pruners.base.PruneResult`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.models.vit import ViT
from vitprune.pruners.base import RECONSTRUCT_MODES, Run
from vitprune.pruners.selection import CRITERIA
from vitprune.pruners.settings import setting
from vitprune.pruners.structural import StructuralConfig, StructuralPruner
from vitprune.scoring.hessian import MODES, HessianSaliency, compute_saliency


@dataclass
class NViTConfig(StructuralConfig):
    """Settings of one NViT run (see the module docstring): the paper's, except two defaults of ours that won on
    the tuning split (benchmarks/results/matched_latency.md): ranking by saliency per MAC saved, and a closed-form
    reconstruction of proj / fc2 after selection. ``PAPER`` holds the paper's values of the two."""

    PAPER: ClassVar[dict[str, object]] = {"criterion": "saliency", "reconstruct": "off"}

    criterion: str = setting(
        "per_cost", choices=CRITERIA,
        help="greedy: score per cost saved (ours, default), or the paper's score (saliency)",
    )  # fmt: skip
    reconstruct: str = setting(
        "sequential", choices=RECONSTRUCT_MODES,
        help="closed-form reconstruction of proj / fc2 after selection (ours, default; the paper: off)",
    )  # fmt: skip
    reconstruct_images: int = setting(1024, low=1, help="calibration images of the reconstruction")
    reconstruct_damping: float = setting(1e-2, low=0.0, help="ridge damping x mean diag(X^T X) of the solves")
    prune_steps: int = setting(10, low=1, help="removal rounds (each reaches 1 - (1 - target) * step / steps)")
    batches_per_step: int = setting(8, low=1, help="saliency batches accumulated before each round")
    scoring: str = setting(
        "hessian", choices=("hessian", "reconstruction"),
        help="unit scores: NViT's Hessian saliency, or the ZipLM cost of removal with optimal compensation",
    )  # fmt: skip
    saliency_mode: str = setting(
        "labels",
        choices=MODES,
        flag="saliency",
        help="gradients from the labels or from labels sampled from the teacher",
    )

    def check(self) -> None:
        super().check()
        other = [k for k in self.kinds if k not in ("heads", "v", "mlp")]
        if self.scoring == "reconstruction" and other:
            raise VitPruneError(
                f"--scoring reconstruction scores heads, v and mlp only (not {','.join(other)}): "
                "pass --kinds heads,v,mlp"
            )


class NViTPruner(StructuralPruner):
    """NViT: global structural pruning by Hessian-aware saliency, re-scored before each round (latency-aware
    with a LUT)."""

    Config: ClassVar[type[NViTConfig]] = NViTConfig

    def scores(self, student: ViT, batches: Iterator, step: int, run: Run) -> dict[str, Tensor]:
        cfg = self.config
        if cfg.scoring == "reconstruction":  # ZipLM: tr(W_S [H^-1]_SS^-1 W_S^T), reconstruction-aware
            from vitprune.pruners.reconstruct import reconstruction_scores

            return reconstruction_scores(
                student, batches, num_images=cfg.reconstruct_images, damping=cfg.reconstruct_damping,
                kinds=cfg.kinds, device=run.device,
            )  # fmt: skip
        return compute_saliency(
            student,
            batches,
            cfg.batches_per_step,
            cfg.saliency_mode,
            teacher=run.teacher,
            device=run.device,
            accumulator=HessianSaliency(student),
            seed=cfg.seed + step,
            progress=False,
        )


__all__ = ["NViTConfig", "NViTPruner"]
