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

``NViTPruner(target_macs=0.5, ...).prune(model, loader)`` returns the smaller ViT and a JSON report. The target
is checked for reachability before any work. With ``out_dir`` a run writes ``nvit_state.pt`` after each step
(resumable), ``masks.json``, ``finetune/`` (Trainer run), ``model/``, ``report.json`` and ``dims.png``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import block_macs, block_params, count_macs, count_params
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.models.io import save as io_save
from vitprune.models.vit import ViT
from vitprune.pruners.recovery import DistillTrainingSettings
from vitprune.reports import arch_summary, plot_block_dims, write_json_report
from vitprune.scoring.hessian import MODES, HessianSaliency, compute_saliency
from vitprune.structures.groups import unit_key
from vitprune.structures.masks import StructuralMasks, apply_masks
from vitprune.structures.surgery import prune_model_with_report
from vitprune.training import distributed as D
from vitprune.training.checkpoint import load_checkpoint, save_checkpoint
from vitprune.training.engine import TrainConfig, Trainer
from vitprune.utils.fs import atomic_write_text, check_writable_target

METRICS = ("macs", "params", "latency")
KINDS = ("heads", "qk", "v", "mlp", "emb", "block")
DEFAULT_CHUNKS = {"emb": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 16}
CRITERIA = ("saliency", "per_cost")
STATE_NAME = "nvit_state.pt"


@dataclass
class NViTConfig(DistillTrainingSettings):
    """Settings of one NViT run (see the module docstring)."""

    target: float = 0.5  # kept fraction of the dense cost, in (0, 1]
    metric: str = "macs"  # "macs", "params" or "latency" (needs a LatencyTable)
    kinds: tuple[str, ...] = KINDS  # which structures may be pruned
    chunks: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CHUNKS))
    prune_steps: int = 10  # removal rounds (each reaches 1 - (1 - target) * step / prune_steps)
    batches_per_step: int = 8  # saliency batches accumulated before each round
    saliency_mode: str = "labels"  # "labels" (CE on labels) or "distill" (labels sampled from the dense model)
    criterion: str = "saliency"  # "saliency" (NViT: I(S) [- eta dLat]) or "per_cost" (that / cost saved)
    latency_weight: float = 1.0  # eta as a multiple of median(I) / median(dLat) of the first round; 0: off
    eta: float | None = None  # an explicit eta (saliency per ms) instead of latency_weight
    min_emb: int | None = None  # embedding channels never pruned below this (default: one EMB chunk)
    train_steps_between: int = 0  # distillation steps after each removal round (not after the last)

    def __post_init__(self) -> None:
        if not isinstance(self.target, (int, float)) or not 0 < self.target <= 1:
            raise VitPruneError(f"target {self.metric} fraction must be in (0, 1], got {self.target!r}")
        if self.metric not in METRICS:
            raise VitPruneError(f"unknown target metric {self.metric!r} (expected one of {', '.join(METRICS)})")
        self.kinds = tuple(self.kinds)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise VitPruneError(f"unknown structure kind(s) {', '.join(bad) or '(none)'}: use {', '.join(KINDS)}")
        chunks = dict(DEFAULT_CHUNKS)
        for k, v in dict(self.chunks).items():
            if k not in DEFAULT_CHUNKS:
                raise VitPruneError(f"unknown chunk kind {k!r} (expected {', '.join(DEFAULT_CHUNKS)})")
            if not isinstance(v, int) or v < 1:
                raise VitPruneError(f"chunk size of {k} must be a positive integer, got {v!r}")
            chunks[k] = v
        self.chunks = chunks
        for name in ("prune_steps", "batches_per_step"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise VitPruneError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("train_steps_between", "finetune_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise VitPruneError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)!r}")
        if self.saliency_mode not in MODES:
            raise VitPruneError(f"unknown saliency mode {self.saliency_mode!r} (expected {', '.join(MODES)})")
        if self.criterion not in CRITERIA:
            raise VitPruneError(f"unknown criterion {self.criterion!r} (expected {', '.join(CRITERIA)})")
        if not math.isfinite(self.latency_weight) or self.latency_weight < 0:
            raise VitPruneError(f"latency weight must be >= 0, got {self.latency_weight}")
        if self.eta is not None and (not math.isfinite(self.eta) or self.eta < 0):
            raise VitPruneError(f"eta must be >= 0, got {self.eta}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise VitPruneError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.min_emb is not None and (not isinstance(self.min_emb, int) or self.min_emb < 1):
            raise VitPruneError(f"min_emb must be a positive integer, got {self.min_emb!r}")
        self.train_config("between")
        self.train_config("finetune")

    def train_config(self, phase: str, resume: bool = False, overwrite: bool = False) -> TrainConfig:
        """Trainer settings of ``phase`` ("between" pruning rounds or "finetune")."""
        if phase == "between":
            return self.trainer_config(self.train_steps_between, self.lr, 0, resume, overwrite)
        return self.trainer_config(self.finetune_steps, self.finetune_lr, self.ckpt_every, resume, overwrite)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


# ------------------------------------------------------------------------------------------------ cost model
class CostModel:
    """``cost(arch) = stem(emb) + sum_b block(emb, b)`` for MACs, parameters or LUT latency (ms)."""

    def __init__(self, config: ViTConfig, metric: str, lut: Any = None, img_size: int | None = None) -> None:
        self.metric = metric
        self.lut = lut
        self.config = config
        self.tokens = count_macs(config, img_size)["tokens"]
        self.img_size = img_size
        if metric == "latency" and lut is None:
            raise VitPruneError("a latency target needs a latency lookup table (vitprune lut build)")

    def stem(self, emb: int) -> float:
        bare = replace(self.config, embed_dim=emb, blocks=[])
        if self.metric == "macs":
            return float(count_macs(bare, self.img_size)["total"])
        if self.metric == "params":
            return float(count_params(bare))
        return self.lut.stem(emb)

    def block(self, emb: int, b: BlockConfig) -> float:
        if self.metric == "macs":
            return float(block_macs(emb, b, self.tokens)["total"])
        if self.metric == "params":
            return float(block_params(emb, b, self.config.qkv_bias)["total"])
        return self.lut.block(emb, b)

    def total(self, emb: int, blocks: list[BlockConfig | None]) -> float:
        return self.stem(emb) + sum(self.block(emb, b) for b in blocks if b is not None)


def _round_up(n: int, full: int, multiple: int | None) -> int:
    if not multiple or n == 0 or n == full:
        return n
    return min(full, math.ceil(n / multiple) * multiple)


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

    def arch(self) -> ViTConfig:
        blocks = [c for c in (self.block_cfg(b) for b in range(len(self.blocks))) if c is not None]
        return replace(self.config, embed_dim=self.emb_dim(), blocks=blocks, extra={})


# ------------------------------------------------------------------------------------------------ selection
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


def select_removals(
    config: ViTConfig,
    masks: StructuralMasks,
    scores: dict[str, Tensor],
    settings: NViTConfig,
    cost: CostModel,
    target_cost: float,
    latency: CostModel | None = None,
    eta: float | None = None,
) -> tuple[list[dict[str, Any]], float | None]:
    """Greedy global removal (NViT Sec. 3): remove the lowest-valued chunk of any kind / block until
    ``cost <= target_cost``; updates ``masks`` in place. Returns the removed chunks and the eta used."""
    counts = _Counts(config, masks, settings.round_to)
    chunks = settings.chunks
    min_emb = settings.min_emb or chunks["emb"]
    queues: dict[tuple[str, int | None], list[int]] = {}
    for b, bm in enumerate(masks.blocks):
        if not bm.keep:
            continue
        for kind in ("heads", "qk", "v", "mlp"):
            if kind in settings.kinds:
                alive = torch.nonzero(getattr(bm, kind)).flatten()
                s = scores[unit_key(kind, b)].double()[alive]
                queues[(kind, b)] = alive[torch.argsort(s, stable=True)].tolist()
    if "emb" in settings.kinds:
        alive = torch.nonzero(masks.emb).flatten()
        queues[("emb", None)] = alive[torch.argsort(scores["emb"].double()[alive], stable=True)].tolist()

    def block_costs(model: CostModel, emb: int) -> list[float]:
        return [
            model.block(emb, c) if (c := counts.block_cfg(b)) is not None else 0.0 for b in range(len(counts.blocks))
        ]

    removed: list[dict[str, Any]] = []
    now = cost.total(counts.emb_dim(), [counts.block_cfg(b) for b in range(len(counts.blocks))])
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
                cfgs = [counts.block_cfg(i) for i in range(len(counts.blocks))]
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
        if "block" in settings.kinds:
            for b, row in enumerate(counts.blocks):
                if row[0] and per_block[b] > 0:
                    lat = lat_block[b] if lat_block is not None else 0.0
                    sc = float(scores[unit_key("block", b)].double().sum())
                    cands.append(_Candidate("block", b, [0], sc, per_block[b], lat))
        if not cands:
            raise VitPruneError(
                f"cannot reach the target: nothing left to remove at {now / cost_dense(cost):.4f} of the dense cost"
            )
        if latency is not None and eta is None:
            pos = [c for c in cands if c.latency_saving > 0]
            if pos:
                med_s = statistics.median(c.score for c in pos)
                med_l = statistics.median(c.latency_saving for c in pos)
                eta = settings.latency_weight * med_s / med_l if med_l > 0 else 0.0
            else:
                eta = 0.0
        for c in cands:
            c.value = c.score - (eta or 0.0) * c.latency_saving
            if settings.criterion == "per_cost":
                c.value /= c.saving
        best = min(cands, key=lambda c: (c.value, c.kind, -1 if c.block is None else c.block))
        # apply
        if best.kind == "block":
            counts.blocks[best.block][0] = False
            masks.blocks[best.block].keep = False
            for kind in ("heads", "qk", "v", "mlp"):
                queues.pop((kind, best.block), None)
        elif best.kind == "emb":
            counts.emb -= len(best.units)
            masks.emb[best.units] = False
            del queues[("emb", None)][: len(best.units)]
        else:
            counts.blocks[best.block][_FIELD[best.kind]] -= len(best.units)
            getattr(masks.blocks[best.block], best.kind)[best.units] = False
            del queues[(best.kind, best.block)][: len(best.units)]
        now = cost.total(counts.emb_dim(), [counts.block_cfg(b) for b in range(len(counts.blocks))])
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


def cost_dense(cost: CostModel) -> float:
    c = cost.config
    return cost.total(c.embed_dim, list(c.blocks))


# ------------------------------------------------------------------------------------------------ pruner
def _cycle(loader: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise VitPruneError("the data loader yields no batches")


class NViTPruner:
    """NViT end to end; see the module docstring. Exactly one of ``target_macs`` / ``target_params`` /
    ``target_latency`` (with ``lut``, a :class:`vitprune.latency.lut.LatencyTable`)."""

    def __init__(
        self,
        target_macs: float | None = None,
        target_params: float | None = None,
        target_latency: float | None = None,
        lut: Any = None,
        *,
        out_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        resume: bool = False,
        overwrite: bool = False,
        **settings: Any,
    ) -> None:
        given = [
            (m, t) for m, t in zip(METRICS, (target_macs, target_params, target_latency), strict=True) if t is not None
        ]
        if len(given) != 1:
            raise VitPruneError("give exactly one target: target_macs, target_params or target_latency")
        unknown = sorted(set(settings) - {f.name for f in fields(NViTConfig)} | ({"target", "metric"} & set(settings)))
        if unknown:
            raise VitPruneError(f"unknown NViT settings: {', '.join(unknown)}")
        metric, target = given[0]
        self.config = NViTConfig(target=target, metric=metric, **settings)
        if metric == "latency" and lut is None:
            raise VitPruneError("a latency target needs a latency lookup table (--lut FILE, see 'vitprune lut build')")
        self.lut = lut
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = torch.device(device)
        self.resume = resume
        self.overwrite = overwrite

    # ------------------------------------------------------------------------------------------- checks
    def cost_model(self, config: ViTConfig) -> CostModel:
        return CostModel(config, self.config.metric, self.lut, self.config.img_size)

    def min_fraction(self, config: ViTConfig) -> float:
        """Smallest reachable fraction of the dense cost with the allowed kinds (after rounding)."""
        cfg = self.config
        cost = self.cost_model(config)
        masks = StructuralMasks.all_kept(config)
        if "emb" in cfg.kinds:
            keep = min(config.embed_dim, cfg.min_emb or cfg.chunks["emb"])
            masks.emb[keep:] = False
        for bm in masks.blocks:
            bm.keep = "block" not in cfg.kinds
            for kind in ("heads", "qk", "v", "mlp"):
                if kind in cfg.kinds:
                    getattr(bm, kind)[:] = False
        counts = _Counts(config, masks, cfg.round_to)
        blocks = [counts.block_cfg(b) for b in range(len(counts.blocks))]
        return cost.total(counts.emb_dim(), blocks) / cost_dense(cost)

    def check(self, model: nn.Module) -> None:
        """Raise :class:`VitPruneError` unless ``model`` can be pruned to the target (before any work)."""
        if not isinstance(model, ViT):
            raise VitPruneError(f"NViT needs a vitprune ViT, got {type(model).__name__}")
        gates = sorted(
            n for n, _ in [*model.named_buffers(), *model.named_parameters()] if n.endswith(("gate", "emb_mask"))
        )
        if gates:
            raise VitPruneError(f"model already carries gates ({gates[0]}, ...): prune or remove them first")
        cfg = self.config
        if self.lut is not None:
            self.lut.covers(model.config)
        low = self.min_fraction(model.config)
        if low > cfg.target:
            raise VitPruneError(
                f"target {cfg.metric} fraction {cfg.target:g} is unreachable: removing every allowed structure "
                f"({','.join(cfg.kinds)}) leaves {low:.4f} of the dense {cfg.metric}"
            )
        if self.out_dir is not None:
            if self.resume:
                if not (self.out_dir / STATE_NAME).is_file():
                    raise VitPruneError(f"nothing to resume: no {STATE_NAME} in {self.out_dir}")
            elif self.out_dir.exists() and any(self.out_dir.iterdir()):
                if not self.overwrite:
                    raise VitPruneError(f"output exists: {self.out_dir} (use --overwrite or --resume)")
                check_writable_target(self.out_dir, overwrite=True)
            else:
                check_writable_target(self.out_dir, overwrite=True)

    # ------------------------------------------------------------------------------------------- pipeline
    def prune(
        self,
        model: ViT,
        loader: Iterable,
        teacher: nn.Module | None = None,
        eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    ) -> tuple[ViT, dict[str, Any]]:
        """Prune a copy of ``model`` (left unchanged) with batches from ``loader``; returns (smaller ViT, report).

        ``teacher`` (distillation and the "distill" saliency mode) defaults to the dense ``model``;
        ``eval_fn(model) -> dict`` is run on the dense, the masked (before fine-tuning) and the final model.
        """
        self.check(model)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        mode = model.training
        try:
            return self._prune(model, loader, teacher if teacher is not None else model, eval_fn)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(mode)

    def _state(self, step, student, masks, history, eta, scores, dense) -> dict[str, Any]:
        return {
            "step": step,
            "model": {k: v.detach().cpu() for k, v in student.state_dict().items()},
            "masks": masks.to_json(),
            "history": json.dumps(history),
            "eta": eta,
            "scores": {k: v.cpu() for k, v in (scores or {}).items()},
            "settings": json.dumps(self.config.to_dict(), sort_keys=True),
            "dense_config": dense.to_json(),
        }

    def _prune(self, model, loader, teacher, eval_fn) -> tuple[ViT, dict[str, Any]]:
        cfg = self.config
        t0 = time.perf_counter()
        out = self.out_dir
        main = D.is_main_process()
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
            if not self.resume:  # an overwritten run: no stale results of the previous one may survive
                for name in (STATE_NAME, "masks.json", "report.json", "dims.png"):
                    (out / name).unlink(missing_ok=True)
                for name in ("model", "finetune"):
                    shutil.rmtree(out / name, ignore_errors=True)
        dense = copy.deepcopy(model.config)
        cost = self.cost_model(dense)
        latency = CostModel(dense, "latency", self.lut, cfg.img_size) if self.lut is not None else None
        latency_aware = latency is not None and ((cfg.eta is None and cfg.latency_weight > 0) or bool(cfg.eta))
        dense_cost = cost_dense(cost)
        report: dict[str, Any] = {
            "method": "nvit",
            "paper": "Yang et al. 2023, Global Vision Transformer Pruning with Hessian-Aware Saliency (NViT)",
            "settings": cfg.to_dict(),
            "target": {"metric": cfg.metric, "fraction": cfg.target},
            "dense": arch_summary(dense, cfg.img_size),
        }
        if self.lut is not None:
            report["dense"]["latency_pred_ms"] = self.lut.predict(dense)
            report["lut"] = {k: self.lut.meta.get(k) for k in ("device_name", "dtype", "batch_size", "threads")}
        if eval_fn is not None:
            report["dense"]["eval"] = _eval(eval_fn, model)

        student = copy.deepcopy(model).to(self.device).requires_grad_(True)  # a frozen input model still gets scored
        teacher = teacher.to(self.device).eval()
        masks = StructuralMasks.all_kept(dense)
        history: list[dict[str, Any]] = []
        eta = cfg.eta if latency_aware else None
        scores: dict[str, Tensor] | None = None
        start = 0
        if self.resume and out is not None and (out / STATE_NAME).is_file():
            state = load_checkpoint(out / STATE_NAME)
            if (
                state["settings"] != json.dumps(cfg.to_dict(), sort_keys=True)
                or state["dense_config"] != dense.to_json()
            ):
                raise VitPruneError(f"cannot resume {out}: the model or NViT settings differ from the saved run")
            masks = StructuralMasks.from_json(state["masks"])
            apply_masks(student, masks)
            student.load_state_dict(state["model"])
            history, eta, scores, start = json.loads(state["history"]), state["eta"], state["scores"], state["step"]
        apply_masks(student, masks)

        batches = _cycle(loader)
        bar = tqdm(total=cfg.prune_steps, initial=start, desc="nvit", disable=not (cfg.progress and main))
        try:
            for step in range(start, cfg.prune_steps):
                frac = 1.0 - (1.0 - cfg.target) * (step + 1) / cfg.prune_steps
                t_step = time.perf_counter()
                acc = HessianSaliency(student)
                scores = compute_saliency(
                    student,
                    batches,
                    cfg.batches_per_step,
                    cfg.saliency_mode,
                    teacher=teacher,
                    device=self.device,
                    accumulator=acc,
                    seed=cfg.seed + step,
                    progress=False,
                )
                removed, eta = select_removals(
                    dense, masks, scores, cfg, cost, frac * dense_cost, latency if latency_aware else None, eta
                )
                apply_masks(student, masks)
                record = self._record(step, frac, masks, removed, dense, dense_cost, cost)
                record["time_s"] = round(time.perf_counter() - t_step, 2)
                if cfg.train_steps_between > 0 and step < cfg.prune_steps - 1:
                    trainer = Trainer(
                        student, cfg.train_config("between"), loader, teacher=teacher, out_dir=None, device=self.device
                    )
                    summary = trainer.fit()
                    record["train_loss"] = summary.get("final_loss")
                    apply_masks(student, masks)
                history.append(record)
                bar.update(1)
                bar.set_postfix(frac=f"{record['fraction']:.3f}")
                if out is not None and main:
                    save_checkpoint(
                        out / STATE_NAME, self._state(step + 1, student, masks, history, eta, scores, dense)
                    )
                D.barrier()
        finally:
            bar.close()
        report["history"] = history
        report["eta"] = eta
        report["masks"] = masks.counts()
        if eval_fn is not None:
            report["masked_eval"] = _eval(eval_fn, student)

        small, surgery = prune_model_with_report(student, masks, round_to=cfg.round_to, scores=scores)
        small = small.to(self.device)
        report["rounding"] = surgery["rounding"]
        if out is not None and main:
            atomic_write_text(out / "masks.json", masks.to_json() + "\n", overwrite=True)
        if eval_fn is not None:
            report["pruned_before_finetune_eval"] = _eval(eval_fn, small)
        if cfg.finetune_steps > 0:
            trainer = Trainer(
                small,
                cfg.train_config("finetune", self.resume, self.overwrite or self.resume),
                loader,
                teacher=teacher,
                out_dir=out / "finetune" if out is not None else None,
                device=self.device,
            )
            report["finetune"] = {k: v for k, v in trainer.fit().items() if k != "config"}
        small.eval()
        report["pruned"] = arch_summary(small.config, cfg.img_size)
        report["pruned"]["fraction"] = {
            "macs": report["pruned"]["macs"] / report["dense"]["macs"],
            "params": report["pruned"]["params"] / report["dense"]["params"],
        }
        if self.lut is not None:
            report["pruned"]["latency_pred_ms"] = self.lut.predict(small.config)
            report["pruned"]["fraction"]["latency_pred"] = (
                report["pruned"]["latency_pred_ms"] / report["dense"]["latency_pred_ms"]
            )
        report["pruned"]["kept_blocks"] = [b for b, bm in enumerate(masks.blocks) if bm.keep]
        if eval_fn is not None:
            report["pruned"]["eval"] = _eval(eval_fn, small)
        report["time_s"] = round(time.perf_counter() - t0, 2)
        if out is not None and main:
            io_save(small, out / "model", overwrite=True, meta={"nvit": {"target": report["target"]}})
            self.write_report(report, dense, small.config)
        D.barrier()
        return small, report

    def _record(self, step, frac, masks, removed, dense, dense_cost, cost) -> dict[str, Any]:
        counts = _Counts(dense, masks, self.config.round_to)
        arch = counts.arch()
        by_kind: dict[str, int] = {}
        for r in removed:
            by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["units"]
        rec = {
            "step": step + 1,
            "target_fraction": round(frac, 6),
            "fraction": cost.total(arch.embed_dim, list(arch.blocks)) / dense_cost,
            "macs_fraction": count_macs(arch, self.config.img_size)["total"]
            / count_macs(dense, self.config.img_size)["total"],
            "params_fraction": count_params(arch) / count_params(dense),
            "removed_units": by_kind,
            "removed_chunks": len(removed),
        }
        if self.lut is not None:
            rec["latency_pred_fraction"] = self.lut.predict(arch) / self.lut.predict(dense)
        return rec

    def write_report(self, report: dict[str, Any], before: ViTConfig, after: ViTConfig) -> None:
        """``report.json`` and the per-block dims plot ``dims.png`` in ``out_dir`` (atomically)."""
        if self.out_dir is None:
            return
        write_json_report(self.out_dir / "report.json", report)
        plot_block_dims(
            before, after, self.out_dir / "dims.png", title="NViT", kept_blocks=report["pruned"]["kept_blocks"]
        )


def _eval(eval_fn: Callable[[nn.Module], dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    was = model.training
    model.eval()
    with torch.no_grad():
        result = dict(eval_fn(model))
    model.train(was)
    return result
