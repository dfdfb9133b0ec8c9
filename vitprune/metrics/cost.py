"""The one cost model every structural selector uses: MACs, parameters or LUT latency of an architecture.

``cost(arch) = stem(emb) + sum_b block(emb, b)``: the stem is everything outside the blocks (patch embedding,
tokens, final norm, head) at embedding width ``emb``; a block's cost depends on the embedding width and its own
(heads, QK, V, MLP) widths. MACs and parameters are exact (:mod:`vitprune.metrics.flops`); latency comes from a
:class:`~vitprune.latency.lut.LatencyTable` measured on the user's device (NViT Sec. 3.3: the latency of a
pruned architecture as a sum of per-block table look-ups). The cost of removing a group is the difference of
two such costs (:meth:`CostModel.saving`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import block_macs, block_params, count_macs, count_params
from vitprune.models.config import BlockConfig, ViTConfig

METRICS = ("macs", "params", "latency")


class CostModel:
    """Cost of architectures derived from ``config`` (same image size, tokens and classes) in one ``metric``."""

    def __init__(self, config: ViTConfig, metric: str, lut: Any = None, img_size: int | None = None) -> None:
        if metric not in METRICS:
            raise VitPruneError(f"unknown cost metric {metric!r} (expected one of {', '.join(METRICS)})")
        if metric == "latency" and lut is None:
            raise VitPruneError("a latency target needs a latency lookup table (--lut FILE, see 'vitprune lut build')")
        self.metric = metric
        self.lut = lut
        self.config = config
        self.img_size = img_size
        self.tokens = count_macs(config, img_size)["tokens"]

    def stem(self, emb: int) -> float:
        """Cost outside the blocks at embedding width ``emb``."""
        bare = replace(self.config, embed_dim=emb, blocks=[])
        if self.metric == "macs":
            return float(count_macs(bare, self.img_size)["total"])
        if self.metric == "params":
            return float(count_params(bare))
        return self.lut.stem(emb)

    def block(self, emb: int, b: BlockConfig) -> float:
        """Cost of one block with widths ``b`` in a residual stream of width ``emb``."""
        if self.metric == "macs":
            return float(block_macs(emb, b, self.tokens)["total"])
        if self.metric == "params":
            return float(block_params(emb, b, self.config.qkv_bias)["total"])
        return self.lut.block(emb, b)

    def total(self, emb: int, blocks: list[BlockConfig | None]) -> float:
        """Cost of the architecture with embedding width ``emb`` and ``blocks`` (``None``: a removed block)."""
        return self.stem(emb) + sum(self.block(emb, b) for b in blocks if b is not None)

    def of(self, arch: ViTConfig) -> float:
        """Cost of a whole architecture."""
        return self.total(arch.embed_dim, list(arch.blocks))

    @property
    def dense(self) -> float:
        """Cost of the unpruned architecture."""
        return self.of(self.config)

    def fraction(self, arch: ViTConfig) -> float:
        """``cost(arch) / cost(dense)``."""
        return self.of(arch) / self.dense

    def saving(self, before: ViTConfig, after: ViTConfig) -> float:
        """What removing a group (``before`` -> ``after``) saves."""
        return self.of(before) - self.of(after)


__all__ = ["METRICS", "CostModel"]
