"""VTP: Vision Transformer Pruning with learned dimension gates and L1 sparsity (Zhu, Tang & Han, 2021).

The paper's pipeline (its Fig. 1 and method section; the seed text in shared/seeds has no equation numbers, so
the formulas are named by content), for every prunable dimension of a linear projection:

1. a learnable gate vector ``a`` (initialised to 1) multiplies the features, ``X* = X diag(a)``;
2. *sparsity training* minimises ``L(X; W, a) + lambda * sum_l ||a_l||_1``;
3. ONE global threshold ``tau`` on ``|a|`` keeps the dimensions with ``|a| >= tau`` and removes the rest; the
   surviving gate values are folded into the weights and the physically smaller model is built;
4. fine-tuning (here: distillation from the dense model).

Gates on a :class:`~vitprune.models.ViT` (kinds as in :mod:`vitprune.structures.groups`):

========  ======================================================================================================
``qk``    ``attn.qk_gate`` (qk_dim,): query dim j of every head (heads stay aligned); removing j drops q and k
          row j in every head. Folded into the q rows.
``v``     ``attn.v_gate`` (v_dim,): value dim j of every head; removing j drops v row j and the proj columns.
          Folded into the v rows.
``mlp``   ``mlp.gate`` (mlp_dim,): hidden neuron j after GELU; folded into fc2 column j.
``heads`` ``attn.head_gate`` (heads,), optional (the paper's future work): whole heads, folded into proj.
``emb``   optional: one gate per residual channel c, shared by every LayerNorm (norm1, norm2 of every block and
          the final norm) as a scale of its output, i.e. of its weight and bias (a ``torch.nn.utils.parametrize``
          parametrisation). In a pre-norm ViT the residual stream is read only through those LayerNorms, so the
          gate scales *every read* of channel c and folds exactly into the LayerNorm weights and biases.
========  ======================================================================================================

Q and K dims share one gate applied to q (the score ``(q*a) . k`` is bilinear, so one gate is enough and folds
into q alone); V dims have their own gate, so QK and V widths are pruned independently.

Exactness. After thresholding, removed gates are set to exactly 0 (for ``emb``: a 0/1 ``emb_mask``, which also
takes the removed channels out of the LayerNorm statistics) and :func:`~vitprune.structures.prune_model` folds
the kept gate values into the weights: the smaller model computes exactly what the gated model with its removed
gates at zero computes. For ``emb`` that equality holds for the *masked* gated model; the step from "gate -> 0"
to "channel removed" also drops the channel from the LayerNorm mean/variance, which a gate cannot express (a
channel's contribution to the statistics is not a foldable scale). That one-time change is what the
fine-tuning phase absorbs; it is why ``emb`` is off by default.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs, count_params
from vitprune.models.config import ViTConfig
from vitprune.models.io import attach_gate, is_model_dir
from vitprune.models.io import load as io_load
from vitprune.models.io import save as io_save
from vitprune.models.vit import ViT
from vitprune.pruners.recovery import DistillTrainingSettings
from vitprune.reports import arch_summary, plot_block_dims, write_json_report
from vitprune.structures.groups import parse_key, unit_count, unit_key
from vitprune.structures.masks import StructuralMasks, apply_masks, architecture_after
from vitprune.structures.surgery import prune_model, round_masks
from vitprune.training import distributed as D
from vitprune.training.engine import TrainConfig, Trainer
from vitprune.utils.fs import atomic_write_text, check_writable_target

GATE_KINDS = ("qk", "v", "mlp", "heads", "emb")
DEFAULT_GATES = ("qk", "v", "mlp")
METRICS = ("macs", "params")
_BLOCK_GATES = {
    "qk": ("attn", "qk_gate"),
    "v": ("attn", "v_gate"),
    "mlp": ("mlp", "gate"),
    "heads": ("attn", "head_gate"),
}


# --------------------------------------------------------------------------------------------- embedding gate
EMB_GATE_NAME = "vtp_emb_gate"


class ScaleByGate(nn.Module):
    """Parametrisation ``w -> w * gate`` of a LayerNorm weight or bias.

    The gate is registered once, on the model (``model.vtp_emb_gate``); every LayerNorm's parametrisation holds
    an unregistered reference to it, so the state dict stores it once (safetensors refuses shared tensors) and
    ``copy.deepcopy`` keeps the sharing (one memo).
    """

    def __init__(self, gate: nn.Parameter) -> None:
        super().__init__()
        self.__dict__["_gate"] = gate  # not a submodule parameter: registered on the model only

    @property
    def gate(self) -> nn.Parameter:
        return self.__dict__["_gate"]

    def forward(self, value: Tensor) -> Tensor:
        return value * self.gate


def _layer_norms(model: ViT) -> list[nn.LayerNorm]:
    return [n for blk in model.blocks for n in (blk.norm1, blk.norm2)] + [model.norm]


def emb_gate(model: ViT) -> nn.Parameter | None:
    """The shared embedding-channel gate of ``model`` (None when not attached)."""
    return model._parameters.get(EMB_GATE_NAME)


def _attach_emb_gate(model: ViT) -> nn.Parameter:
    ref = model.pos_embed
    gate = nn.Parameter(torch.ones(model.embed_dim, device=ref.device, dtype=ref.dtype))
    model.register_parameter(EMB_GATE_NAME, gate)
    for norm in _layer_norms(model):
        for name in ("weight", "bias"):
            parametrize.register_parametrization(norm, name, ScaleByGate(gate))
    return gate


@torch.no_grad()
def fold_emb_gate(model: ViT) -> ViT:
    """Fold the embedding gate into every LayerNorm's weight and bias (exact), in place.

    Each parametrised LayerNorm is *replaced* by a plain one holding ``weight * a`` and ``bias * a``, rather than
    calling ``remove_parametrizations`` (which edits the parametrised class shared with any deep copy).
    """
    if emb_gate(model) is None:
        return model

    def plain(norm: nn.LayerNorm) -> nn.LayerNorm:
        w, b = norm.weight, norm.bias
        out = nn.LayerNorm(w.shape[0], eps=norm.eps, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        out.bias.copy_(b)
        return out

    for blk in model.blocks:
        blk.norm1 = plain(blk.norm1)
        blk.norm2 = plain(blk.norm2)
    model.norm = plain(model.norm)
    del model._parameters[EMB_GATE_NAME]
    return model


# --------------------------------------------------------------------------------------------- gates
def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in GATE_KINDS]
    if bad:
        raise VitPruneError(f"unknown VTP gate kind(s): {', '.join(bad)} (expected some of {', '.join(GATE_KINDS)})")
    if not kinds:
        raise VitPruneError("no VTP gate kinds selected")
    return kinds


def _has_gates(model: ViT) -> list[str]:
    found = [n for n, b in model.named_buffers() if b is not None and n.rsplit(".", 1)[-1] in _GATE_LEAVES]
    found += [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in _GATE_LEAVES]
    if emb_gate(model) is not None:
        found.append("emb")
    return found


_GATE_LEAVES = {"head_gate", "qk_gate", "v_gate", "gate", "branch_gate", "emb_mask"}


def attach_vtp_gates(model: ViT, kinds: Sequence[str] = DEFAULT_GATES) -> dict[str, nn.Parameter]:
    """Attach learnable gates (initialised to 1) of ``kinds`` to ``model`` in place (VTP: ``X* = X diag(a)``).

    Returns the gates keyed by :func:`vitprune.structures.groups.unit_key` (``"blocks.3.qk"``, ``"emb"``).
    Blocks whose branch is already empty (0 heads / 0 QK or V dims / 0 MLP neurons) get no gate of that kind.
    """
    kinds = _check_kinds(kinds)
    existing = _has_gates(model)
    if existing:
        raise VitPruneError(f"model already carries gates ({existing[0]}, ...): prune or remove them first")
    ref = model.pos_embed
    gates: dict[str, nn.Parameter] = {}
    for b, blk in enumerate(model.blocks):
        for kind in kinds:
            if kind == "emb":
                continue
            n = unit_count(model.config, kind, b)
            if n == 0:
                continue
            sub, name = _BLOCK_GATES[kind]
            module = getattr(blk, sub)
            attach_gate(module, name, torch.ones(n, device=ref.device, dtype=ref.dtype), learnable=True)
            gates[unit_key(kind, b)] = module._parameters[name]
    if "emb" in kinds:
        gates["emb"] = _attach_emb_gate(model)
    return gates


def vtp_gates(model: ViT) -> dict[str, nn.Parameter]:
    """The learnable VTP gates present on ``model`` keyed by unit key (block kinds first, then ``emb``)."""
    gates: dict[str, nn.Parameter] = {}
    for b, blk in enumerate(model.blocks):
        for kind, (sub, name) in _BLOCK_GATES.items():
            p = getattr(blk, sub)._parameters.get(name)
            if p is not None:
                gates[unit_key(kind, b)] = p
    g = emb_gate(model)
    if g is not None:
        gates["emb"] = g
    return gates


def l1_penalty(gates: dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """``sum_l ||a_l||_1`` over every gate vector (the VTP sparsity term, multiplied by lambda by the caller)."""
    values = list(gates.values()) if isinstance(gates, dict) else list(gates)
    if not values:
        raise VitPruneError("no gates to regularise")
    return torch.stack([v.abs().sum() for v in values]).sum()


def gate_stats(gates: dict[str, Tensor], eps: float = 1e-2) -> dict[str, float]:
    """Summary of the gate magnitudes: mean, min, max |a| and the fraction below ``eps``."""
    flat = torch.cat([g.detach().abs().reshape(-1).float().cpu() for g in gates.values()])
    return {
        "mean": float(flat.mean()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        f"frac_below_{eps:g}": float((flat < eps).float().mean()),
        "count": int(flat.numel()),
    }


# --------------------------------------------------------------------------------------------- global threshold
def architecture_cost(config: ViTConfig, metric: str, img_size: int | None = None) -> int:
    """Exact MACs (per image) or parameter count of an architecture (:mod:`vitprune.metrics.flops`)."""
    if metric == "macs":
        return int(count_macs(config, img_size)["total"])
    if metric == "params":
        return int(count_params(config))
    raise VitPruneError(f"unknown target metric {metric!r} (expected one of {', '.join(METRICS)})")


class GlobalThreshold:
    """One global ordering of every gated unit by ``|a|`` (ascending) and the masks of its prefixes.

    ``masks(k)`` removes the ``k`` smallest-|a| units (exact ties are spread evenly over the gate vectors); the
    largest-|a| embedding channel is never a candidate, so at least one channel stays. With
    ``round_to`` every kept QK / V / MLP / embedding width is rounded up to a multiple (the best removed units
    come back, see :func:`vitprune.structures.round_masks`). The cost of ``masks(k)`` is non-increasing in ``k``.
    """

    def __init__(
        self,
        config: ViTConfig,
        scores: dict[str, Tensor],
        metric: str = "macs",
        round_to: int | None = None,
        img_size: int | None = None,
    ) -> None:
        if metric not in METRICS:
            raise VitPruneError(f"unknown target metric {metric!r} (expected one of {', '.join(METRICS)})")
        self.config, self.metric, self.round_to, self.img_size = config, metric, round_to, img_size
        self.scores = {k: v.detach().abs().reshape(-1).float().cpu() for k, v in scores.items()}
        cands, vals, fracs = [], [], []
        for key, s in self.scores.items():
            kind, b = parse_key(key)
            if s.numel() != unit_count(config, kind, b):
                raise VitPruneError(f"gate {key} has {s.numel()} values, the model has {unit_count(config, kind, b)}")
            cand = torch.arange(s.numel())
            if kind == "emb":
                cand = cand[cand != int(torch.argmax(s))]
            cands.append(cand)
            vals.append(s[cand])
            fracs.append((cand.double() + 0.5) / s.numel())
        values = torch.cat(vals) if vals else torch.zeros(0)
        # ascending |a|; exact ties go round-robin over the gate vectors (by relative position j / n), so tied
        # gates (e.g. untrained ones) are removed evenly from every block instead of block after block
        by_position = torch.argsort(torch.cat(fracs) if fracs else torch.zeros(0), stable=True)
        order = by_position[torch.sort(values[by_position], stable=True).indices]
        self.sorted_values = values[order]
        self.num_candidates = int(values.numel())
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(order.numel())
        # rank of every unit in the global ascending order; non-candidates get num_candidates (never removed)
        self._rank: dict[str, Tensor] = {}
        pos = 0
        for (key, s), cand in zip(self.scores.items(), cands, strict=True):
            rank = torch.full((s.numel(),), self.num_candidates, dtype=torch.long)
            rank[cand] = ranks[pos : pos + cand.numel()]
            self._rank[key] = rank
            pos += cand.numel()
        self.dense_cost = architecture_cost(config, metric, img_size)
        self._cache: dict[int, int] = {}

    def masks(self, k: int) -> StructuralMasks:
        """Masks removing the ``k`` lowest-|a| candidates (then rounded when ``round_to`` is set)."""
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
        return out

    def cost(self, k: int) -> int:
        if k not in self._cache:
            cfg = architecture_after(self.config, self.masks(k))
            self._cache[k] = architecture_cost(cfg, self.metric, self.img_size)
        return self._cache[k]

    @property
    def min_fraction(self) -> float:
        """Smallest reachable cost fraction (every candidate removed)."""
        return self.cost(self.num_candidates) / self.dense_cost

    def select(self, target: float) -> tuple[int, StructuralMasks, dict[str, Any]]:
        """Fewest removals ``k`` whose cost is ``<= target * dense cost`` (binary search; cost is monotone)."""
        check_fraction(target, f"target {self.metric} fraction")
        budget = target * self.dense_cost
        if self.cost(self.num_candidates) > budget:
            raise VitPruneError(
                f"target {self.metric} fraction {target:g} is unreachable: removing every gated unit leaves "
                f"{self.min_fraction:.4f} of the dense {self.metric} (patch embedding, head and ungated parts stay)"
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
            "largest_removed_abs_gate": removed_max,
            "smallest_kept_abs_gate": kept_min,
            "round_to": self.round_to,
        }
        return k, self.masks(k), info


def check_fraction(value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise VitPruneError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def unit_scores_for(config: ViTConfig, kinds: Sequence[str]) -> dict[str, Tensor]:
    """All-ones scores for every unit the gates of ``kinds`` would cover (to check a target before training)."""
    scores: dict[str, Tensor] = {}
    for b in range(config.depth):
        for kind in kinds:
            if kind != "emb" and unit_count(config, kind, b) > 0:
                scores[unit_key(kind, b)] = torch.ones(unit_count(config, kind, b))
    if "emb" in kinds:
        scores["emb"] = torch.ones(config.embed_dim)
    return scores


# --------------------------------------------------------------------------------------------- fold + prune
@torch.no_grad()
def zero_removed_gates(model: ViT, masks: StructuralMasks) -> ViT:
    """Set the removed units' gates to exactly 0 (and a 0/1 ``emb_mask``): the gated model equals the pruned one."""
    gates = vtp_gates(model)
    g = gates.get("emb")
    if g is not None:
        g.mul_(masks.emb.to(device=g.device, dtype=g.dtype))
    apply_masks(model, masks)
    return model


class GateOptimizerHook:
    """Post-step hook giving the gates their own AdamW (no weight decay) at ``gate_lr`` (x the run's schedule).

    The Trainer's optimizer updates every parameter at one learning rate; with Adam a gate then moves by at most
    about ``lr`` per step, so at fine-tuning rates (1e-4) gates barely leave 1 within a short budget. This hook
    takes one extra step on the gates with the same gradient (``p.grad`` of the step, which holds the L1 term
    ``lambda * sign(a)`` because the regulariser is in the loss). Its state lives in ``trainer.extra_state`` and is
    checkpointed, so a resumed run continues bit-identically.
    """

    KEY = "vtp_gate_optimizer"

    def __init__(self, gates: dict[str, nn.Parameter], gate_lr: float, base_lr: float) -> None:
        self.gates = list(gates.values())
        self.gate_lr = gate_lr
        self.base_lr = base_lr
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, trainer: Any, step: int) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.gates, lr=self.gate_lr, weight_decay=0.0)
            saved = trainer.extra_state.get(self.KEY)
            if saved is not None:
                self.optimizer.load_state_dict(saved)
        for group in self.optimizer.param_groups:
            group["lr"] = self.gate_lr * trainer.lr / self.base_lr
        self.optimizer.step()
        trainer.extra_state[self.KEY] = self.optimizer.state_dict()


class GateLogHook:
    """Post-step hook recording ``sum |a|`` and gate statistics every ``every`` steps in ``extra_state``."""

    KEY = "vtp_gate_log"

    def __init__(self, gates: dict[str, nn.Parameter], every: int) -> None:
        self.gates = gates
        self.every = max(int(every), 1)

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every and step != trainer.total_steps:
            return
        with torch.no_grad():
            rec = {"step": int(step), "l1": float(l1_penalty(self.gates))} | gate_stats(self.gates)
        trainer.extra_state.setdefault(self.KEY, []).append(rec)


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class VTPConfig(DistillTrainingSettings):
    """Settings of one VTP run (see :class:`VTPPruner`)."""

    target: float = 0.7  # kept fraction of the dense cost, in (0, 1]
    metric: str = "macs"  # "macs" or "params"
    lam: float = 1e-4  # L1 weight lambda
    gates: tuple[str, ...] = DEFAULT_GATES
    sparsity_steps: int = 1000
    finetune_steps: int = 1000
    lr: float = 1e-4  # every weight during sparsity training
    gate_lr: float | None = 1e-2  # extra AdamW on the gates; None: the Trainer's optimizer alone (as the paper)
    grad_clip: float = 0.0

    def __post_init__(self) -> None:
        self.gates = _check_kinds(self.gates)
        check_fraction(self.target, f"target {self.metric} fraction")
        if self.metric not in METRICS:
            raise VitPruneError(f"unknown target metric {self.metric!r} (expected one of {', '.join(METRICS)})")
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            raise VitPruneError(f"lambda must be a non-negative number, got {self.lam!r}")
        for name in ("sparsity_steps", "finetune_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise VitPruneError(f"{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if self.gate_lr is not None and not (math.isfinite(self.gate_lr) and self.gate_lr > 0):
            raise VitPruneError(f"gate learning rate must be positive, got {self.gate_lr!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise VitPruneError(f"round_to must be a positive integer, got {self.round_to!r}")
        # the training configs validate lr, amp, ... now, before any training
        self.train_config("sparsity")
        self.train_config("finetune")

    def train_config(self, phase: str, resume: bool = False, overwrite: bool = False) -> TrainConfig:
        """The Trainer settings of ``phase`` ("sparsity" or "finetune"); a 0-step phase is skipped by the caller."""
        if phase == "sparsity":
            return self.trainer_config(self.sparsity_steps, self.lr, self.ckpt_every, resume, overwrite)
        return self.trainer_config(self.finetune_steps, self.finetune_lr, self.ckpt_every, resume, overwrite)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gates"] = list(self.gates)
        return d


class VTPPruner:
    """VTP end to end: gates -> L1 sparsity training -> one global threshold -> fold + surgery -> fine-tuning.

    ``VTPPruner(target_macs=0.7, lam=1e-4, sparsity_steps=..., finetune_steps=..., out_dir=...).prune(model,
    loader)`` returns the physically smaller :class:`ViT` and a JSON-friendly report. Every input is checked
    (including whether the target is reachable by removing gated units) before any training or writing.

    With ``out_dir`` the run writes ``sparsity/`` and ``finetune/`` (Trainer runs: metrics.jsonl, checkpoints),
    ``pruned/`` (the smaller model right after surgery) and ``selection.json`` (threshold, masks, gate stats),
    then ``model/`` (the final model),
    ``report.json`` and ``dims.png``. ``resume=True`` continues an interrupted run from the last checkpoint.
    """

    def __init__(
        self,
        target_macs: float | None = None,
        target_params: float | None = None,
        *,
        out_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        resume: bool = False,
        overwrite: bool = False,
        **settings: Any,
    ) -> None:
        if (target_macs is None) == (target_params is None):
            raise VitPruneError("give exactly one target: target_macs or target_params")
        metric, target = ("macs", target_macs) if target_macs is not None else ("params", target_params)
        unknown = sorted(set(settings) - {f.name for f in fields(VTPConfig)} - {"target", "metric"})
        if unknown or "target" in settings or "metric" in settings:
            raise VitPruneError(f"unknown VTP settings: {', '.join(unknown or ['target/metric'])}")
        self.config = VTPConfig(target=target, metric=metric, **settings)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = torch.device(device)
        self.resume = resume
        self.overwrite = overwrite

    # ------------------------------------------------------------------------------------------- checks
    def check(self, model: nn.Module) -> GlobalThreshold:
        """Raise :class:`VitPruneError` unless ``model`` can be pruned to the target (no training needed)."""
        if not isinstance(model, ViT):
            raise VitPruneError(f"VTP needs a vitprune ViT, got {type(model).__name__}")
        existing = _has_gates(model)
        if existing:
            raise VitPruneError(f"model already carries gates ({existing[0]}, ...): prune or remove them first")
        cfg = self.config
        gt = GlobalThreshold(
            model.config, unit_scores_for(model.config, cfg.gates), cfg.metric, cfg.round_to, cfg.img_size
        )
        if gt.num_candidates == 0:
            raise VitPruneError(f"the model has no prunable {'/'.join(cfg.gates)} units")
        if gt.min_fraction > cfg.target:
            raise VitPruneError(
                f"target {cfg.metric} fraction {cfg.target:g} is unreachable with gates {','.join(cfg.gates)}: "
                f"removing every gated unit leaves {gt.min_fraction:.4f} of the dense {cfg.metric}"
            )
        if self.out_dir is not None:
            if self.resume:
                if not self.out_dir.is_dir():
                    raise VitPruneError(f"nothing to resume: {self.out_dir} does not exist")
            elif self.out_dir.exists() and any(self.out_dir.iterdir()):
                if not self.overwrite:
                    raise VitPruneError(f"output exists: {self.out_dir} (use --overwrite or --resume)")
                check_writable_target(self.out_dir, overwrite=True)
            else:
                check_writable_target(self.out_dir, overwrite=True)
        return gt

    # ------------------------------------------------------------------------------------------- pipeline
    def prune(
        self,
        model: ViT,
        loader: Iterable,
        teacher: nn.Module | None = None,
        eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    ) -> tuple[ViT, dict[str, Any]]:
        """Prune ``model`` (left unchanged) with training batches from ``loader``; see the class docstring.

        ``teacher`` defaults to ``model`` itself (distillation from the dense model) when ``distill_alpha > 0``;
        ``eval_fn(model) -> dict`` (e.g. top-1 on a validation loader) is run on the dense, the pruned (before
        fine-tuning) and the final model for the report.
        """
        self.check(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        mode = model.training
        try:
            return self._prune(model, loader, teacher, eval_fn)
        finally:  # the Trainer freezes the teacher (by default the input model): give it back as it came
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(mode)

    def _prune(
        self,
        model: ViT,
        loader: Iterable,
        teacher: nn.Module | None,
        eval_fn: Callable[[nn.Module], dict[str, Any]] | None,
    ) -> tuple[ViT, dict[str, Any]]:
        cfg = self.config
        t_start = time.perf_counter()
        out = self.out_dir
        main = D.is_main_process()
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
        if teacher is None and cfg.distill_alpha > 0:
            teacher = model
        dense_config = copy.deepcopy(model.config)
        report: dict[str, Any] = {
            "method": "vtp",
            "paper": "Zhu, Tang & Han 2021, Vision Transformer Pruning (L1-regularised dimension gates)",
            "settings": cfg.to_dict(),
            "target": {"metric": cfg.metric, "fraction": cfg.target},
            "dense": arch_summary(dense_config, cfg.img_size),
        }
        if eval_fn is not None:
            report["dense"]["eval"] = _eval(eval_fn, model)

        # ---- 1. gates + L1 sparsity training (or reload the surgery result of an interrupted run)
        pruned_dir = out / "pruned" if out is not None else None
        if self.resume and pruned_dir is not None and is_model_dir(pruned_dir) and (out / "selection.json").is_file():
            small = io_load(pruned_dir).to(self.device)
            saved = json.loads((out / "selection.json").read_text())
            report |= saved
        else:
            small, phase1 = self._sparsity_and_surgery(model, loader, teacher)
            report |= phase1
            if out is not None and main:
                io_save(small, pruned_dir, overwrite=True, meta={"vtp": phase1["selection"]})
                atomic_write_text(out / "selection.json", json.dumps(phase1, indent=2) + "\n", overwrite=True)
            D.barrier()
        if eval_fn is not None:
            report["pruned_before_finetune_eval"] = _eval(eval_fn, small)

        # ---- 2. fine-tuning of the smaller model (distillation from the dense model by default)
        if cfg.finetune_steps > 0:
            trainer = Trainer(
                small,
                cfg.train_config("finetune", self.resume, self.overwrite or self.resume),
                loader,
                teacher=teacher,
                out_dir=out / "finetune" if out is not None else None,
                device=self.device,
            )
            report["finetune"] = _summary(trainer.fit())
        small.eval()
        report["pruned"] = arch_summary(small.config, cfg.img_size)
        report["pruned"]["fraction"] = {
            "macs": report["pruned"]["macs"] / report["dense"]["macs"],
            "params": report["pruned"]["params"] / report["dense"]["params"],
        }
        report["pruned"]["kept_blocks"] = list(range(small.config.depth))  # VTP never removes whole blocks
        if eval_fn is not None:
            report["pruned"]["eval"] = _eval(eval_fn, small)
        report["time_s"] = round(time.perf_counter() - t_start, 2)
        if out is not None and main:
            io_save(small, out / "model", overwrite=True, meta={"vtp": report.get("selection")})
            self.write_report(report, dense_config, small.config)
        D.barrier()
        return small, report

    def write_report(self, report: dict[str, Any], before: ViTConfig, after: ViTConfig) -> None:
        """``report.json`` and the per-block dims plot ``dims.png`` (dense vs pruned) in ``out_dir``, atomically."""
        if self.out_dir is None:
            return
        write_json_report(self.out_dir / "report.json", report)
        plot_block_dims(
            before, after, self.out_dir / "dims.png", title="VTP", kept_blocks=report["pruned"]["kept_blocks"]
        )

    def _sparsity_and_surgery(self, model: ViT, loader: Iterable, teacher: nn.Module | None) -> tuple[ViT, dict]:
        cfg = self.config
        out = self.out_dir
        student = copy.deepcopy(model).to(self.device)
        gates = attach_vtp_gates(student, cfg.gates)
        lam = float(cfg.lam)
        result: dict[str, Any] = {}
        if cfg.sparsity_steps > 0:
            hooks: list[Callable] = []
            if cfg.gate_lr is not None:
                hooks.append(GateOptimizerHook(gates, cfg.gate_lr, cfg.lr))
            hooks.append(GateLogHook(gates, cfg.log_every))
            trainer = Trainer(
                student,
                cfg.train_config("sparsity", self.resume, self.overwrite or self.resume),
                loader,
                teacher=teacher,
                out_dir=out / "sparsity" if out is not None else None,
                device=self.device,
                hooks=hooks,
                regularizer=lambda _m: lam * l1_penalty(gates),
            )
            result["sparsity"] = _summary(trainer.fit())
            result["gate_log"] = trainer.extra_state.get(GateLogHook.KEY, [])
        student.eval()
        gt = GlobalThreshold(model.config, gates, cfg.metric, cfg.round_to, cfg.img_size)
        _, masks, info = gt.select(cfg.target)
        result["selection"] = info
        result["gates"] = {
            key: {"kept": int(masks.get(key).sum()), "total": int(g.numel())} | gate_stats({key: g})
            for key, g in gates.items()
        }
        result["masks"] = masks.to_dict()
        probe = _first_images(loader, self.device)
        zero_removed_gates(student, masks)
        with torch.no_grad():
            gated_out = student(probe) if probe is not None else None
        fold_emb_gate(student)
        small = prune_model(student, masks).eval()
        if probe is not None:
            with torch.no_grad():
                diff = (small(probe) - gated_out).abs().max()
            result["fold_check"] = {"max_abs_logit_diff": float(diff), "images": int(probe.shape[0])}
        return small, result


def _first_images(loader: Iterable, device: torch.device, n: int = 8) -> Tensor | None:
    """A few images from the loader, to check that the pruned model equals the gated one on real data."""
    try:
        batch = next(iter(loader))
    except (StopIteration, TypeError):
        return None
    x = batch if isinstance(batch, Tensor) else batch[0]
    return x[:n].to(device)


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "config"}


def _eval(eval_fn: Callable[[nn.Module], dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    was = model.training
    model.eval()
    with torch.no_grad():
        result = dict(eval_fn(model))
    model.train(was)
    return result
