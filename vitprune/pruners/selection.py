"""Global structural selection against a budget: which units to remove, given per-unit scores.

Three selectors, all costed by the one :class:`~vitprune.metrics.cost.CostModel`, all taking scores keyed by
:func:`~vitprune.structures.groups.unit_key` (``"blocks.3.mlp"`` -> one score per MLP neuron of block 3):

- ``greedy`` (NViT Sec. 3, the paper's iterative global ranking): the lowest-scored units of every (block, kind)
  form chunks (EMB 16, head 1, QK 8, V 8, MLP 16 by default; a chunk scores the sum of its units); ALL chunks of
  all kinds and blocks compete in one list by ``I(S)`` - or ``I(S) - eta * dLat(S)`` with a latency table (NViT's
  latency-aware regularisation) - optionally divided by the cost the chunk saves (``criterion="per_cost"``);
  chunks are removed from the bottom until the cost target is met.
- ``threshold`` (VTP: one global threshold on ``|score|``): the fewest lowest-``|score|`` units whose removal meets
  the target (binary search; exact ties spread round-robin over the score vectors).
- ``uniform`` (the magnitude baselines' "same fraction in every block"): the largest kept fraction ``r`` of
  every allowed kind in every block (highest scores kept) whose architecture meets the target (bisection).

Each selector has ``min_fraction`` (the smallest reachable cost, checked before any work) and ``select``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.metrics.cost import CostModel
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.structures.groups import parse_key, unit_count, unit_key
from vitprune.structures.masks import StructuralMasks, architecture_after, uniform_masks
from vitprune.structures.surgery import round_masks

BLOCK_KINDS = ("heads", "qk", "v", "mlp")
KINDS = (*BLOCK_KINDS, "emb", "block")
DEFAULT_CHUNKS = {"emb": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 16}
CRITERIA = ("saliency", "per_cost")


class SelectionOptions(Protocol):
    """What a selector reads from a structural pruner's config."""

    kinds: tuple[str, ...]
    chunks: dict[str, int]
    round_to: int | None
    criterion: str
    min_emb: int | None
    latency_weight: float


def _round_up(n: int, full: int, multiple: int | None) -> int:
    if not multiple or n == 0 or n == full:
        return n
    return min(full, math.ceil(n / multiple) * multiple)


def rounded_arch(config: ViTConfig, masks: StructuralMasks, round_to: int | None, scores=None) -> ViTConfig:
    """The architecture ``masks`` give after rounding kept widths up to ``round_to``."""
    if round_to:
        masks, _ = round_masks(config, masks, round_to, scores)
    return architecture_after(config, masks)


# ------------------------------------------------------------------------------------------------ greedy
class _Counts:
    """Kept-unit counts of the masked model and the (rounded) architecture they give."""

    def __init__(self, config: ViTConfig, masks: StructuralMasks, round_to: int | None) -> None:
        self.config = config
        self.round_to = round_to
        self.emb = int(masks.emb.sum())
        self.blocks = [
            [bm.keep, int(bm.heads.sum()), int(bm.qk.sum()), int(bm.v.sum()), int(bm.mlp.sum())] for bm in masks.blocks
        ]

    def emb_dim(self, emb: int | None = None) -> int:
        return _round_up(self.emb if emb is None else emb, self.config.embed_dim, self.round_to)

    def block_cfg(self, b: int, row: list | None = None) -> BlockConfig | None:
        keep, h, q, v, m = row if row is not None else self.blocks[b]
        if not keep:
            return None
        full = self.config.blocks[b]
        if h == 0 or v == 0:
            h = q = v = 0
        r = self.round_to
        return BlockConfig(
            h,
            _round_up(q, full.qk_dim, r) if h else 0,
            _round_up(v, full.v_dim, r) if h else 0,
            _round_up(m, full.mlp_dim, r),
            scale=full.scale,
        )

    def cfgs(self) -> list[BlockConfig | None]:
        return [self.block_cfg(b) for b in range(len(self.blocks))]

    def arch(self) -> ViTConfig:
        blocks = [c for c in self.cfgs() if c is not None]
        return replace(self.config, embed_dim=self.emb_dim(), blocks=blocks, extra={})


_FIELD = {"heads": 1, "qk": 2, "v": 3, "mlp": 4}


@dataclass
class _Candidate:
    kind: str
    block: int | None
    units: list[int]
    score: float
    saving: float
    latency_saving: float = 0.0
    value: float = 0.0


def greedy_select(
    config: ViTConfig,
    masks: StructuralMasks,
    scores: dict[str, Tensor],
    opts: SelectionOptions,
    cost: CostModel,
    target_cost: float,
    latency: CostModel | None = None,
    eta: float | None = None,
) -> tuple[list[dict[str, Any]], float | None]:
    """Greedy global removal (NViT Sec. 3): remove the lowest-valued chunk of any kind / block until
    ``cost <= target_cost``; updates ``masks`` in place. Returns the removed chunks and the eta used."""
    counts = _Counts(config, masks, opts.round_to)
    chunks = opts.chunks
    min_emb = opts.min_emb or chunks["emb"]
    queues: dict[tuple[str, int | None], list[int]] = {}
    for b, bm in enumerate(masks.blocks):
        if not bm.keep:
            continue
        for kind in BLOCK_KINDS:
            if kind in opts.kinds:
                alive = torch.nonzero(getattr(bm, kind)).flatten()
                s = scores[unit_key(kind, b)].double()[alive]
                queues[(kind, b)] = alive[torch.argsort(s, stable=True)].tolist()
    if "emb" in opts.kinds:
        alive = torch.nonzero(masks.emb).flatten()
        queues[("emb", None)] = alive[torch.argsort(scores["emb"].double()[alive], stable=True)].tolist()

    def block_costs(model: CostModel, emb: int) -> list[float]:
        return [
            model.block(emb, c) if (c := counts.block_cfg(b)) is not None else 0.0 for b in range(len(counts.blocks))
        ]

    removed: list[dict[str, Any]] = []
    now = cost.total(counts.emb_dim(), counts.cfgs())
    while now > target_cost:
        emb_now = counts.emb_dim()
        per_block = block_costs(cost, emb_now)
        lat_block = block_costs(latency, emb_now) if latency is not None else None
        cands: list[_Candidate] = []
        for (kind, b), queue in queues.items():
            if not queue:
                continue
            if kind == "emb":
                n = min(chunks["emb"], counts.emb - min_emb)
                if n <= 0:
                    continue
                units = queue[:n]
                new_emb = counts.emb_dim(counts.emb - n)
                cfgs = counts.cfgs()
                saving = now - cost.total(new_emb, cfgs)
                lat = latency.total(emb_now, cfgs) - latency.total(new_emb, cfgs) if latency else 0.0
                sc = float(scores["emb"].double()[units].sum())
            else:
                row = list(counts.blocks[b])
                n = min(chunks[kind], len(queue))
                units = queue[:n]
                row[_FIELD[kind]] -= n
                after = counts.block_cfg(b, row)
                saving = per_block[b] - (cost.block(emb_now, after) if after is not None else 0.0)
                lat = 0.0
                if latency is not None:
                    lat = lat_block[b] - (latency.block(emb_now, after) if after is not None else 0.0)
                sc = float(scores[unit_key(kind, b)].double()[units].sum())
            if saving <= 0:
                continue
            cands.append(_Candidate(kind, b, units, sc, saving, lat))
        if "block" in opts.kinds:
            for b, row in enumerate(counts.blocks):
                if row[0] and per_block[b] > 0:
                    lat = lat_block[b] if lat_block is not None else 0.0
                    sc = float(scores[unit_key("block", b)].double().sum())
                    cands.append(_Candidate("block", b, [0], sc, per_block[b], lat))
        if not cands:
            raise VitPruneError(
                f"cannot reach the target: nothing left to remove at {now / cost.dense:.4f} of the dense cost"
            )
        if latency is not None and eta is None:
            pos = [c for c in cands if c.latency_saving > 0]
            if pos:
                med_s = statistics.median(c.score for c in pos)
                med_l = statistics.median(c.latency_saving for c in pos)
                eta = opts.latency_weight * med_s / med_l if med_l > 0 else 0.0
            else:
                eta = 0.0
        for c in cands:
            c.value = c.score - (eta or 0.0) * c.latency_saving
            if opts.criterion == "per_cost":
                c.value /= c.saving
        best = min(cands, key=lambda c: (c.value, c.kind, -1 if c.block is None else c.block))
        if best.kind == "block":
            counts.blocks[best.block][0] = False
            masks.blocks[best.block].keep = False
            for kind in BLOCK_KINDS:
                queues.pop((kind, best.block), None)
        elif best.kind == "emb":
            counts.emb -= len(best.units)
            masks.emb[best.units] = False
            del queues[("emb", None)][: len(best.units)]
        else:
            counts.blocks[best.block][_FIELD[best.kind]] -= len(best.units)
            getattr(masks.blocks[best.block], best.kind)[best.units] = False
            del queues[(best.kind, best.block)][: len(best.units)]
        now = cost.total(counts.emb_dim(), counts.cfgs())
        removed.append(
            {
                "kind": best.kind,
                "block": best.block,
                "units": len(best.units) if best.kind != "block" else 1,
                "saliency": best.score,
                "saving": best.saving,
            }
        )
    return removed, eta


def greedy_min_fraction(config: ViTConfig, opts: SelectionOptions, cost: CostModel) -> float:
    """Smallest reachable fraction of the dense cost with the allowed kinds (after rounding)."""
    masks = StructuralMasks.all_kept(config)
    if "emb" in opts.kinds:
        keep = min(config.embed_dim, opts.min_emb or opts.chunks["emb"])
        masks.emb[keep:] = False
    for bm in masks.blocks:
        bm.keep = "block" not in opts.kinds
        for kind in BLOCK_KINDS:
            if kind in opts.kinds:
                getattr(bm, kind)[:] = False
    counts = _Counts(config, masks, opts.round_to)
    return cost.total(counts.emb_dim(), counts.cfgs()) / cost.dense


def counted_arch(config: ViTConfig, masks: StructuralMasks, round_to: int | None) -> ViTConfig:
    """The (rounded) architecture the greedy selector costs for ``masks``."""
    return _Counts(config, masks, round_to).arch()


# ------------------------------------------------------------------------------------------------ threshold
def unit_scores_for(config: ViTConfig, kinds: Sequence[str]) -> dict[str, Tensor]:
    """All-ones scores for every unit of ``kinds`` (to check a target before any scoring)."""
    scores: dict[str, Tensor] = {}
    for b in range(config.depth):
        for kind in kinds:
            if kind in BLOCK_KINDS and unit_count(config, kind, b) > 0:
                scores[unit_key(kind, b)] = torch.ones(unit_count(config, kind, b))
    if "emb" in kinds:
        scores["emb"] = torch.ones(config.embed_dim)
    return scores


class GlobalThreshold:
    """One global ordering of every scored unit by ``|score|`` (ascending) and the masks of its prefixes.

    ``masks(k)`` removes the ``k`` smallest units (exact ties are spread evenly over the score vectors); the
    largest embedding channel is never a candidate, so at least one channel stays. With ``round_to`` every kept
    QK / V / MLP / embedding width is rounded up to a multiple (the best removed units come back, see
    :func:`vitprune.structures.surgery.round_masks`). The cost of ``masks(k)`` is non-increasing in ``k``.
    """

    def __init__(
        self,
        config: ViTConfig,
        scores: dict[str, Tensor],
        cost: CostModel,
        round_to: int | None = None,
        within: StructuralMasks | None = None,
    ) -> None:
        """``within``: masks of an earlier round; every result keeps inside them (removed units stay removed)."""
        self.config, self.cost_model, self.round_to, self.within = config, cost, round_to, within
        self.metric = cost.metric
        self.scores = {k: v.detach().abs().reshape(-1).float().cpu() for k, v in scores.items()}
        cands, vals, fracs = [], [], []
        for key, s in self.scores.items():
            kind, b = parse_key(key)
            if s.numel() != unit_count(config, kind, b):
                raise VitPruneError(
                    f"scores {key} have {s.numel()} values, the model has {unit_count(config, kind, b)}"
                )
            cand = torch.arange(s.numel())
            if kind == "emb":
                cand = cand[cand != int(torch.argmax(s))]
            cands.append(cand)
            vals.append(s[cand])
            fracs.append((cand.double() + 0.5) / s.numel())
        values = torch.cat(vals) if vals else torch.zeros(0)
        # ascending |score|; exact ties go round-robin over the vectors (by relative position j / n), so tied
        # units (e.g. untrained gates) are removed evenly from every block instead of block after block
        by_position = torch.argsort(torch.cat(fracs) if fracs else torch.zeros(0), stable=True)
        order = by_position[torch.sort(values[by_position], stable=True).indices]
        self.sorted_values = values[order]
        self.num_candidates = int(values.numel())
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel())
        self._rank: dict[str, Tensor] = {}
        pos = 0
        for (key, s), cand in zip(self.scores.items(), cands, strict=True):
            rank = torch.full((s.numel(),), self.num_candidates, dtype=torch.long)
            rank[cand] = ranks[pos : pos + cand.numel()]
            self._rank[key] = rank
            pos += cand.numel()
        self.dense_cost = cost.dense
        self._cache: dict[int, float] = {}

    def masks(self, k: int) -> StructuralMasks:
        """Masks removing the ``k`` lowest candidates (then rounded when ``round_to`` is set)."""
        out = StructuralMasks.all_kept(self.config)
        for key, rank in self._rank.items():
            kind, b = parse_key(key)
            keep = rank >= k
            if kind == "emb":
                out.emb = keep
            else:
                setattr(out.blocks[b], kind, keep)
        if self.round_to and self.round_to > 1:
            out, _ = round_masks(self.config, out, self.round_to, self.scores)
        if self.within is not None:
            out = _intersect(out, self.within)
        return out

    def cost(self, k: int) -> float:
        if k not in self._cache:
            self._cache[k] = self.cost_model.of(architecture_after(self.config, self.masks(k)))
        return self._cache[k]

    @property
    def min_fraction(self) -> float:
        """Smallest reachable cost fraction (every candidate removed)."""
        return self.cost(self.num_candidates) / self.dense_cost

    def select(self, target: float) -> tuple[int, StructuralMasks, dict[str, Any]]:
        """Fewest removals ``k`` whose cost is ``<= target * dense cost`` (binary search; cost is monotone)."""
        if not isinstance(target, (int, float)) or not math.isfinite(target) or not 0.0 < target <= 1.0:
            raise VitPruneError(f"target {self.metric} fraction must be in (0, 1], got {target!r}")
        budget = target * self.dense_cost
        if self.cost(self.num_candidates) > budget:
            raise VitPruneError(
                f"target {self.metric} fraction {target:g} is unreachable: removing every scored unit leaves "
                f"{self.min_fraction:.4f} of the dense {self.metric} (patch embedding, head and unscored parts stay)"
            )
        lo, hi = 0, self.num_candidates
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cost(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        removed_max = float(self.sorted_values[k - 1]) if k > 0 else None
        kept_min = float(self.sorted_values[k]) if k < self.num_candidates else None
        info = {
            "metric": self.metric,
            "target_fraction": target,
            "achieved_fraction": self.cost(k) / self.dense_cost,
            "dense_cost": self.dense_cost,
            "pruned_cost": self.cost(k),
            "removed": k,
            "candidates": self.num_candidates,
            "threshold": removed_max,
            "largest_removed_abs_score": removed_max,
            "smallest_kept_abs_score": kept_min,
            "round_to": self.round_to,
        }
        return k, self.masks(k), info


def _intersect(masks: StructuralMasks, within: StructuralMasks) -> StructuralMasks:
    out = masks.copy()
    for key, mask in out.items():
        mask &= within.get(key)
    for bm, wm in zip(out.blocks, within.blocks, strict=True):
        bm.keep = bm.keep and wm.keep
    return out


# ------------------------------------------------------------------------------------------------ uniform
def uniform_select(
    config: ViTConfig,
    scores: dict[str, Tensor],
    kinds: Sequence[str],
    cost: CostModel,
    target: float,
    round_to: int | None,
    iterations: int = 40,
    within: StructuralMasks | None = None,
) -> tuple[StructuralMasks, float]:
    """Keep the same fraction ``r`` of each of ``kinds`` in every block (highest scores first) with the LARGEST
    ``r`` whose architecture (after rounding up to ``round_to``) stays within ``target`` of the dense cost.
    ``within``: masks of an earlier round (their removed units rank last and stay removed)."""
    kinds = [k for k in kinds if k in (*BLOCK_KINDS, "emb")]
    if within is not None:
        scores = {k: v.detach().float().cpu().masked_fill(~within.get(k), -math.inf) for k, v in scores.items()}

    def masks_for(r: float) -> StructuralMasks:
        out = uniform_masks(config, **{k: r for k in kinds}, scores=scores)
        return _intersect(out, within) if within is not None else out

    def frac(r: float) -> float:
        return cost.fraction(rounded_arch(config, masks_for(r), round_to, scores))

    if frac(0.0) > target:
        raise VitPruneError(
            f"target {cost.metric} fraction {target:g} is unreachable by pruning {'/'.join(kinds)} uniformly "
            f"(the minimum is {frac(0.0):.4f})"
        )
    lo, hi = 0.0, 1.0  # invariant: lo meets the target
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if frac(mid) <= target:
            lo = mid
        else:
            hi = mid
    return masks_for(lo), lo


def uniform_min_fraction(config: ViTConfig, kinds: Sequence[str], cost: CostModel, round_to: int | None) -> float:
    kinds = [k for k in kinds if k in (*BLOCK_KINDS, "emb")]
    masks = uniform_masks(config, **{k: 0.0 for k in kinds})
    return cost.fraction(rounded_arch(config, masks, round_to))


SELECTIONS = ("greedy", "threshold", "uniform")

__all__ = [
    "CRITERIA",
    "DEFAULT_CHUNKS",
    "KINDS",
    "SELECTIONS",
    "GlobalThreshold",
    "counted_arch",
    "greedy_min_fraction",
    "greedy_select",
    "rounded_arch",
    "uniform_min_fraction",
    "uniform_select",
    "unit_scores_for",
]
