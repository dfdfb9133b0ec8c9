"""Structural pruning: rounds of scores -> global selection against a budget -> masks, then surgery.

:class:`StructuralPruner` owns targets (MACs / params / LUT latency), the reachability check, the rounds
(a method's :meth:`~StructuralPruner.scores`, then one of the selection rules of :mod:`vitprune.pruners.selection`,
costed by :class:`~vitprune.metrics.cost.CostModel`), optional distillation between rounds, surgery (the physically
smaller model, widths rounded), optional fine-tuning, the report and resume (``workdir/state.pt`` after each round).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.metrics.cost import CostModel
from vitprune.models.vit import ViT
from vitprune.pruners.base import STATE_NAME, Pruner, PrunerConfig, PruneResult, Run, cycle
from vitprune.pruners.settings import FRACTION, OPTIONAL_COUNT, OPTIONAL_STR, setting
from vitprune.training.engine import TrainConfig

TARGET_HELP = "keep this fraction of the dense {}, in (0, 1]"


@dataclass
class StructuralConfig(PrunerConfig):
    """Targets, selection and training settings every structural method shares."""

    target_macs: float | None = setting(None, group="target", help=TARGET_HELP.format("MACs"), **FRACTION)
    target_params: float | None = setting(None, group="target", help=TARGET_HELP.format("params"), **FRACTION)
    target_latency: float | None = setting(
        None, group="target", help=TARGET_HELP.format("latency predicted by --lut"), **FRACTION
    )
    lut: str | None = setting(None, metavar="FILE", help="latency table (vitprune lut build)", **OPTIONAL_STR)
    lut_device: str | None = setting(None, help="device the table must match (default: --device)", **OPTIONAL_STR)
    lut_batch: int | None = setting(None, help="batch size the table must match", **OPTIONAL_COUNT)
    lut_dtype: str | None = setting(None, help="dtype the table must match", **OPTIONAL_STR)
    lut_threads: int | None = setting(None, help="CPU threads the table must match", **OPTIONAL_COUNT)
    force_lut: bool = setting(False, help="use a table built for another setting (warn only)")
    kinds: tuple[str, ...] = setting(
        ("heads", "qk", "v", "mlp", "emb", "block"), kind="strs",
        choices=("heads", "qk", "v", "mlp", "emb", "block"), help="structures that may be removed",
    )  # fmt: skip
    selection: str = setting("greedy", choices=("greedy", "threshold", "uniform"), help="global selection rule")
    criterion: str = setting(
        "saliency", choices=("saliency", "per_cost"), help="greedy: score, or score per cost saved"
    )
    chunks: dict[str, int] = setting(  # noqa: RUF009 - a dataclasses.field with metadata
        default_factory=lambda: {"emb": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 16}, kind="int_map", low=1,
        choices=("emb", "heads", "qk", "v", "mlp"), help="greedy chunk sizes, e.g. emb=16,heads=1,qk=8,v=8,mlp=16",
    )  # fmt: skip
    min_emb: int | None = setting(None, kind="int", low=1, nullable=True, help="never fewer embedding channels")
    latency_weight: float = setting(1.0, low=0.0, help="greedy + LUT: eta relative to median I / median dLat")
    eta: float | None = setting(None, kind="float", low=0.0, nullable=True, help="explicit eta (score per ms)")
    prune_steps: int = setting(1, low=1, help="selection rounds (each reaches 1 - (1 - target) * step / steps)")
    train_steps_between: int = setting(0, low=0, help="distillation steps after each round (not after the last)")
    lr: float = setting(1e-4, low=0.0, low_open=True, help="learning rate of training during pruning")
    round_to: int | None = setting(
        8, kind="int", low=1, nullable=True, zero_is_none=True, help="round kept widths up to a multiple (0: off)"
    )
    img_size: int | None = setting(None, kind="int", low=1, nullable=True, help="image size MACs are counted at")

    def check(self) -> None:
        given = [(m, t) for m, t in zip(("macs", "params", "latency"), self._targets(), strict=True) if t is not None]
        if len(given) != 1:
            raise VitPruneError("give exactly one target: --target-macs, --target-params or --target-latency")
        if self.metric == "latency" and not self.lut:
            raise VitPruneError("a latency target needs a latency lookup table (--lut FILE, see 'vitprune lut build')")
        full = {"emb": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 16}
        self.chunks = full | dict(self.chunks)
        self.kinds = tuple(dict.fromkeys(self.kinds))
        if self.reconstruct_target == "self":
            raise VitPruneError("--reconstruct-target self is for unstructured masks (structural: layer or residual)")
        if self.selection != "greedy":  # only the greedy rule removes whole blocks
            self.kinds = tuple(k for k in self.kinds if k != "block")
        if not self.kinds:
            raise VitPruneError("--kinds selects no structure to prune")

    def _targets(self) -> tuple[float | None, float | None, float | None]:
        return self.target_macs, self.target_params, self.target_latency

    @property
    def metric(self) -> str:
        return next(m for m, t in zip(("macs", "params", "latency"), self._targets(), strict=True) if t is not None)

    @property
    def target(self) -> float:
        return next(t for t in self._targets() if t is not None)

    def between_config(self) -> TrainConfig:
        return self.trainer_config(self.train_steps_between, self.lr, 0)


class StructuralPruner(Pruner):
    """Rounds of scores -> global selection -> masks, then surgery and optional fine-tuning (see module doc)."""

    kind = "structural"
    Config: ClassVar[type[StructuralConfig]] = StructuralConfig

    def __init__(self, config: StructuralConfig | None = None, /, lut: Any = None, **settings: Any) -> None:
        """``lut`` may be a file (the ``lut`` setting) or a loaded :class:`~vitprune.latency.lut.LatencyTable`."""
        self._table = None
        if lut is not None and not isinstance(lut, (str, Path)):
            self._table = lut
            lut = str(getattr(lut, "path", None) or "<in-memory latency table>")
        if lut is not None:
            settings["lut"] = str(lut)
        super().__init__(config, **settings)

    @classmethod
    def budget_settings(cls, steps: int, rounds: int) -> dict[str, Any]:
        """Settings that spend ``steps`` training steps inside the method over ``rounds`` selection rounds, so
        that comparisons give every structural method the same budget (default: distillation between rounds)."""
        between = steps // (rounds - 1) if rounds > 1 else 0
        return {"prune_steps": rounds, "train_steps_between": between}

    # ------------------------------------------------------------------------------------------- method hooks
    def scores(self, student: ViT, batches: Iterator, step: int, run: Run) -> dict[str, Tensor]:
        """Per-unit scores of the masked ``student`` before round ``step``, keyed by
        :func:`~vitprune.structures.groups.unit_key` (low = removed first); ``batches`` cycles the calibration data."""
        raise NotImplementedError

    def prepare(self, student: ViT, run: Run) -> dict[str, Any]:
        """Work on the full model before the rounds (VTP: gates + L1 training); returns report entries."""
        return {}

    def before_surgery(self, student: ViT, masks: Any, run: Run) -> Any:
        """Make the masked ``student`` fold exactly into the smaller model (VTP: zero gates, fold emb gate)."""
        return None

    def after_surgery(self, small: ViT, state: Any) -> dict[str, Any]:
        """Report entries comparing the smaller model with the masked one (VTP: the fold check)."""
        return {}

    # ------------------------------------------------------------------------------------------- cost
    def _lut(self, model: ViT, device: torch.device) -> Any:
        cfg = self.config
        if self._table is not None:
            self._table.covers(model.config)
            return self._table
        if not cfg.lut:
            return None
        from vitprune.latency.lut import LatencyTable
        from vitprune.utils.device import resolve_device

        lut = getattr(self, "_lut_cache", None)
        if lut is None or lut[0] != cfg.lut:
            table = LatencyTable.load(cfg.lut)
            lut_device = resolve_device(cfg.lut_device) if cfg.lut_device else torch.device(device)
            threads = cfg.lut_threads if cfg.lut_threads is not None else table.meta.get("threads")
            table.check_compatible(
                lut_device, cfg.lut_batch, cfg.lut_dtype, threads, force=cfg.force_lut, force_flag="--force-lut"
            )
            self._lut_cache = (cfg.lut, table)
        table = self._lut_cache[1]
        table.covers(model.config)
        return table

    def cost_model(self, config, lut: Any = None) -> CostModel:
        return CostModel(config, self.config.metric, lut, self.config.img_size)

    def min_fraction(self, config, cost: CostModel) -> float:
        """Smallest reachable fraction of the dense cost with the allowed kinds and this selection rule."""
        from vitprune.pruners import selection as S

        cfg = self.config
        if cfg.selection == "greedy":
            return S.greedy_min_fraction(config, cfg, cost)
        if cfg.selection == "uniform":
            return S.uniform_min_fraction(config, cfg.kinds, cost, cfg.round_to)
        gt = S.GlobalThreshold(config, S.unit_scores_for(config, cfg.kinds), cost, cfg.round_to)
        if gt.num_candidates == 0:
            raise VitPruneError(f"the model has no prunable {'/'.join(cfg.kinds)} units")
        return gt.min_fraction

    def check(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        super().check(model)
        from vitprune.models.vit import carried_gates

        gates = carried_gates(model)
        if gates:
            raise VitPruneError(f"model already carries gates ({gates[0]}, ...): prune them first")
        cfg = self.config
        lut = self._lut(model, torch.device(device))
        low = self.min_fraction(model.config, self.cost_model(model.config, lut))
        if low > cfg.target:
            raise VitPruneError(
                f"target {cfg.metric} fraction {cfg.target:g} is unreachable: removing every allowed structure "
                f"({','.join(cfg.kinds)}) leaves {low:.4f} of the dense {cfg.metric}"
            )

    # ------------------------------------------------------------------------------------------- selection
    def _select(self, dense, masks, scores, cost, latency, frac, state, step) -> list[dict[str, Any]]:
        from vitprune.pruners import selection as S

        cfg = self.config
        if cfg.selection == "greedy":
            removed, state["eta"] = S.greedy_select(
                dense, masks, scores, cfg, cost, frac * cost.dense, latency, state.get("eta")
            )
            return removed
        within = masks.copy() if step > 0 else None  # later rounds keep removed units removed
        if cfg.selection == "threshold":
            kept = {k: v for k, v in scores.items() if _kind(k) in cfg.kinds}
            _, new, info = S.GlobalThreshold(dense, kept, cost, cfg.round_to, within).select(frac)
            state["selection"] = info
        else:
            new, r = S.uniform_select(dense, scores, cfg.kinds, cost, frac, cfg.round_to, within=within)
            state["selection"] = {"kept_fraction": r, "kinds": list(cfg.kinds)}
        for key, mask in list(masks.items()):
            mask.copy_(new.get(key))
        for bm, nm in zip(masks.blocks, new.blocks, strict=True):
            bm.keep = nm.keep
        return [state["selection"]]

    # ------------------------------------------------------------------------------------------- pipeline
    def run(self, model: nn.Module, run: Run) -> PruneResult:
        from vitprune.reports import arch_summary
        from vitprune.structures.masks import StructuralMasks, apply_masks
        from vitprune.structures.surgery import prune_model, resolve_masks
        from vitprune.training import distributed as D
        from vitprune.training.checkpoint import load_checkpoint, save_checkpoint

        cfg = self.config
        t0 = time.perf_counter()
        main = D.is_main_process()
        state_path = run.sub(STATE_NAME)
        if state_path is not None and not run.resume and main and state_path.exists():
            state_path.unlink()
        dense = copy.deepcopy(model.config)
        lut = self._lut(model, run.device)
        cost = self.cost_model(dense, lut)
        latency = CostModel(dense, "latency", lut, cfg.img_size) if lut is not None else None
        latency_aware = (
            latency is not None
            and cfg.selection == "greedy"
            and ((cfg.eta is None and cfg.latency_weight > 0) or bool(cfg.eta))
        )
        report: dict[str, Any] = {
            "method": self.name,
            "label": self.label,
            "type": self.kind,
            "paper": self.paper,
            "settings": cfg.to_dict(),
            "target": {"metric": cfg.metric, "fraction": cfg.target},
            "dense": arch_summary(dense, cfg.img_size),
        }
        if lut is not None:
            report["dense"]["latency_pred_ms"] = lut.predict(dense)
            report["lut"] = {k: lut.meta.get(k) for k in ("device_name", "dtype", "batch_size", "threads", "runtime")}
        if run.eval_fn is not None:
            report["dense"]["eval"] = run.eval(model)

        student = copy.deepcopy(model).to(run.device).requires_grad_(True)  # a frozen input model still gets scored
        run.teacher.to(run.device).eval()
        report |= self.prepare(student, run)
        masks = StructuralMasks.all_kept(dense)
        history: list[dict[str, Any]] = []
        state: dict[str, Any] = {"eta": cfg.eta if latency_aware else None}
        scores: dict[str, Tensor] | None = None
        start = 0
        settings_json = json.dumps(cfg.to_dict(), sort_keys=True)
        if run.resume and state_path is not None and state_path.is_file():
            saved = load_checkpoint(state_path)
            if saved["settings"] != settings_json or saved["dense_config"] != dense.to_json():
                raise VitPruneError(
                    f"cannot resume {run.workdir}: the model or the {self.name} settings differ from the run"
                )
            masks = StructuralMasks.from_json(saved["masks"])
            apply_masks(student, masks)
            student.load_state_dict(saved["model"])
            history, scores, start = json.loads(saved["history"]), saved["scores"], saved["round"]
            state = json.loads(saved["state"])
        apply_masks(student, masks)

        batches = cycle(run.data.calib)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.prune_steps, initial=start, desc=self.name, disable=not (cfg.progress and main))
        try:
            for step in range(start, cfg.prune_steps):
                frac = 1.0 - (1.0 - cfg.target) * (step + 1) / cfg.prune_steps
                t_step = time.perf_counter()
                scores = self.scores(student, batches, step, run)
                lat = latency if latency_aware else None
                removed = self._select(dense, masks, scores, cost, lat, frac, state, step)
                apply_masks(student, masks)
                record = self._record(step, frac, masks, removed, dense, cost, lut)
                record["time_s"] = round(time.perf_counter() - t_step, 2)
                if cfg.train_steps_between > 0 and step < cfg.prune_steps - 1:
                    from vitprune.training.engine import Trainer

                    data, teacher = run.data.train, run.teacher
                    trainer = Trainer(student, cfg.between_config(), data, teacher=teacher, device=run.device)
                    record["train_loss"] = trainer.fit().get("final_loss")
                    apply_masks(student, masks)
                history.append(record)
                bar.update(1)
                bar.set_postfix(frac=f"{record['fraction']:.3f}")
                if state_path is not None and main:
                    save_checkpoint(
                        state_path,
                        {
                            "round": step + 1,
                            "model": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                            "masks": masks.to_json(),
                            "history": json.dumps(history),
                            "state": json.dumps(state),
                            "scores": {k: v.detach().cpu() for k, v in (scores or {}).items()},
                            "settings": settings_json,
                            "dense_config": dense.to_json(),
                        },
                    )
                D.barrier()
        finally:
            bar.close()
        report["history"] = history
        for key in ("eta", "selection"):
            if state.get(key) is not None:
                report[key] = state[key]
        report["selected"] = masks.counts()
        if run.eval_fn is not None:
            report["masked_eval"] = run.eval(student)

        fold_state = self.before_surgery(student, masks, run)
        final, rounding = resolve_masks(student, masks, cfg.round_to, scores)
        apply_masks(student, final)  # units brought back by rounding are gated on again
        small = prune_model(student, final).to(run.device)
        _record_map(model, small, final)  # which teacher block / channel each student one is (feature distillation)
        report["rounding"] = rounding
        report |= self.after_surgery(small, fold_state)
        if cfg.reconstruct != "off":
            from vitprune.pruners.reconstruct import reconstruct_structural

            if run.eval_fn is not None:
                report["pruned_before_reconstruction_eval"] = run.eval(small)
            small, report["reconstruction"] = reconstruct_structural(
                model, small, final, run.data.calib, num_images=cfg.reconstruct_images,
                damping=cfg.reconstruct_damping, sequential=cfg.reconstruct == "sequential",
                target=cfg.reconstruct_target or "residual", device=run.device,
            )  # fmt: skip
        if run.eval_fn is not None:
            report["pruned_before_finetune_eval"] = run.eval(small)
        ft = self._finetune(small, run, "finetune")
        if ft is not None:
            report["finetune"] = ft
        small.eval()
        report["pruned"] = arch_summary(small.config, cfg.img_size)
        report["pruned"]["fraction"] = {
            "macs": report["pruned"]["macs"] / report["dense"]["macs"],
            "params": report["pruned"]["params"] / report["dense"]["params"],
        }
        if lut is not None:
            report["pruned"]["latency_pred_ms"] = lut.predict(small.config)
            report["pruned"]["fraction"]["latency_pred"] = (
                report["pruned"]["latency_pred_ms"] / report["dense"]["latency_pred_ms"]
            )
        report["pruned"]["kept_blocks"] = [b for b, bm in enumerate(final.blocks) if bm.keep]
        if run.eval_fn is not None:
            report["pruned"]["eval"] = run.eval(small)
        report["time_s"] = round(time.perf_counter() - t0, 2)
        return PruneResult(small, final, report)

    def _record(self, step, frac, masks, removed, dense, cost, lut) -> dict[str, Any]:
        from vitprune.metrics.flops import count_macs, count_params
        from vitprune.pruners.selection import counted_arch

        cfg = self.config
        arch = counted_arch(dense, masks, cfg.round_to)
        by_kind: dict[str, int] = {}
        for r in removed:
            if "kind" in r:
                by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["units"]
        rec = {
            "step": step + 1,
            "target_fraction": round(frac, 6),
            "fraction": cost.fraction(arch),
            "macs_fraction": count_macs(arch, cfg.img_size)["total"] / count_macs(dense, cfg.img_size)["total"],
            "params_fraction": count_params(arch) / count_params(dense),
            "removed_units": by_kind,
            "removed_chunks": sum(1 for r in removed if "kind" in r),
        }
        if lut is not None:
            rec["latency_pred_fraction"] = lut.predict(arch) / lut.predict(dense)
        return rec


def _record_map(model: ViT, small: ViT, final: Any) -> None:
    """Store in ``small.config.extra`` the teacher block of every kept block and the teacher channel of every kept
    embedding channel, composed with the input model's own map when it was pruned before (a pipeline)."""
    from vitprune.training.features import feature_map_from_masks, record_feature_map

    fmap = feature_map_from_masks(final)
    before_blocks = model.config.extra.get("kept_blocks")
    before_emb = model.config.extra.get("emb_index")
    if before_blocks is not None:
        fmap.block_map = [int(before_blocks[b]) for b in fmap.block_map]
    if before_emb is not None and fmap.emb_index is not None:
        fmap.emb_index = torch.as_tensor(before_emb)[fmap.emb_index]
    record_feature_map(small, fmap)


def _kind(key: str) -> str:
    from vitprune.structures.groups import parse_key

    return parse_key(key)[0]


__all__ = ["StructuralConfig", "StructuralPruner"]
