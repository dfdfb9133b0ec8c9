"""A pruning method defined outside the package, as a user or a new contributor would: one config, one override."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitprune.pruners.settings import setting
from vitprune.pruners.structural import StructuralConfig, StructuralPruner
from vitprune.structures.groups import unit_count, unit_key


@dataclass
class RandomConfig(StructuralConfig):
    kinds: tuple[str, ...] = setting(("mlp",), kind="strs", choices=("qk", "v", "mlp"), help="pruned kinds")
    salt: int = setting(7, low=0, help="seed of the random scores")


class RandomPruner(StructuralPruner):
    """Toy structural method: random scores."""

    Config = RandomConfig

    def scores(self, student, batches, step, run):
        g = torch.Generator().manual_seed(self.config.salt + step)
        cfg = student.config
        return {
            unit_key(k, b): torch.rand(unit_count(cfg, k, b), generator=g)
            for b in range(cfg.depth)
            for k in self.config.kinds
        }
