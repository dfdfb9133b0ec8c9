"""Prunable groups of a ViT, structural masks (as model gates) and surgery to the smaller model."""

from vitprune.structures.groups import KINDS, Group, TensorSlice, enumerate_groups, group_slices, unit_key, zero_group
from vitprune.structures.masks import (
    BlockMasks,
    StructuralMasks,
    apply_masks,
    architecture_after,
    random_masks,
    remove_masks,
    uniform_masks,
)
from vitprune.structures.surgery import prune_model, prune_model_with_report, round_masks

__all__ = [
    "KINDS",
    "BlockMasks",
    "Group",
    "StructuralMasks",
    "TensorSlice",
    "apply_masks",
    "architecture_after",
    "enumerate_groups",
    "group_slices",
    "prune_model",
    "prune_model_with_report",
    "random_masks",
    "remove_masks",
    "round_masks",
    "uniform_masks",
    "unit_key",
    "zero_group",
]
