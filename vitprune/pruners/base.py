"""The one pruning interface: a pruner = a config dataclass + ``prune(model, data, teacher=None) -> PruneResult``.

In the spirit of ``torch.ao.pruning`` (a method is one small override) and Torch-Pruning (graph / importance /
pruner apart):

- :class:`Pruner` holds a validated config (:mod:`vitprune.pruners.settings` fields: the same fields generate
  the CLI options and the recipe schema) and runs ``prune``; it owns no I/O beyond resumable state in
  ``workdir`` (the final outputs are written by :func:`vitprune.pruners.output.write_results`).
- :class:`StructuralPruner` owns everything structural methods share: targets (MACs / params / LUT latency),
  the reachability check, rounds of *score -> global selection against the budget* (:mod:`.selection`, costed
  by :class:`~vitprune.metrics.cost.CostModel`), optional training between rounds, surgery, optional
  fine-tuning, the report and resume. A method supplies only :meth:`StructuralPruner.scores` (and optionally
  :meth:`~StructuralPruner.prepare` / :meth:`~StructuralPruner.before_surgery` hooks).
- :class:`UnstructuredPruner` owns the sparsity targets (a *sweep* returns one result per target), optional
  masked fine-tuning and the report; a method supplies :meth:`UnstructuredPruner.sparsify`.

Every method returns :class:`PruneResult` (or a list of them for a sweep).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.metrics.cost import CostModel
from vitprune.models.vit import ViT
from vitprune.pruners.calibration import DEFAULT_PATTERNS
from vitprune.pruners.settings import setting, setting_dict, validate_settings
from vitprune.training.engine import TrainConfig

EvalFn = Callable[[nn.Module], dict[str, Any]]
STATE_NAME = "state.pt"


# ------------------------------------------------------------------------------------------------ results
@dataclass
class PruneResult:
    """A pruned model, the masks that describe it and a JSON-friendly report.

    ``masks``: :class:`~vitprune.structures.masks.StructuralMasks` over the dense model for structural methods
    (the masked dense model computes what ``model`` computes), ``{param name: bool keep mask}`` for unstructured
    ones. ``target``: the sweep target (sparsity) of an unstructured result, None for structural ones.
    """

    model: nn.Module
    masks: Any
    report: dict[str, Any]
    target: float | None = None

    @property
    def kind(self) -> str:
        return self.report.get("type", "structural")


@dataclass
class PruneData:
    """Calibration batches (scores, Fisher, activation statistics) and training batches (training between
    rounds, VTP's gate training, fine-tuning). A plain loader passed to ``prune`` is used for both."""

    calib: Iterable
    train: Iterable | None = None

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = self.calib


def as_data(data: Any) -> PruneData:
    return data if isinstance(data, PruneData) else PruneData(data)


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over ``loader`` (re-iterated at its end; an empty loader is an error)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise VitPruneError("the data loader yields no batches")


def run_eval(eval_fn: EvalFn | None, model: nn.Module) -> dict[str, Any] | None:
    """``eval_fn(model)`` in eval mode without gradients (the model's mode restored); None without ``eval_fn``."""
    if eval_fn is None:
        return None
    was = model.training
    model.eval()
    with torch.no_grad():
        result = dict(eval_fn(model))
    model.train(was)
    return result


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class PrunerConfig:
    """Recovery (fine-tuning) settings every method shares: distillation from the teacher after pruning."""

    finetune_steps: int = setting(0, low=0, help="distillation fine-tuning steps of the pruned model (0: none)")
    finetune_lr: float = setting(1e-4, low=0.0, low_open=True, help="peak learning rate of fine-tuning")
    min_lr: float = setting(1e-6, low=0.0, help="final learning rate of the cosine schedules")
    weight_decay: float = setting(0.05, low=0.0, help="AdamW weight decay")
    warmup_steps: int = setting(0, low=0, help="linear warm-up steps of each training phase")
    grad_clip: float = setting(1.0, low=0.0, help="gradient-norm clipping (0: off)")
    amp: str = setting("none", choices=("none", "bf16", "fp16"), help="mixed precision of training")
    distill_alpha: float = setting(1.0, low=0.0, high=1.0, help="weight of distillation vs labels (1: no labels)")
    distill_temperature: float = setting(1.0, low=0.0, low_open=True, help="distillation temperature")
    label_smoothing: float = setting(0.0, low=0.0, high=1.0, high_open=True, help="label smoothing")
    seed: int = setting(0, low=0, help="seed of scoring, sampling and training order")
    ckpt_every: int = setting(200, low=0, help="training checkpoint every N steps (resumable)")
    log_every: int = setting(50, low=0, help="training log line every N steps (0: off)")
    progress: bool = setting(True, flag="no-progress", help="no progress bars")

    def __post_init__(self) -> None:
        validate_settings(self)
        self.check()

    def check(self) -> None:
        """Cross-field checks (subclasses extend)."""

    def to_dict(self) -> dict[str, Any]:
        return setting_dict(self)

    def trainer_config(
        self, steps: int, lr: float, ckpt_every: int, resume: bool = False, overwrite: bool = False
    ) -> TrainConfig:
        """A :class:`TrainConfig` for one training phase of ``steps`` steps at peak learning rate ``lr``."""
        return TrainConfig(
            steps=max(steps, 1),
            lr=lr,
            min_lr=min(self.min_lr, lr),
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
            amp=self.amp,
            distill_alpha=self.distill_alpha,
            distill_temperature=self.distill_temperature,
            label_smoothing=self.label_smoothing,
            seed=self.seed,
            ckpt_every=ckpt_every,
            log_every=self.log_every,
            progress=self.progress,
            resume=resume,
            overwrite=overwrite,
            tensorboard=False,
        )

    def finetune_config(self, resume: bool = False) -> TrainConfig:
        return self.trainer_config(self.finetune_steps, self.finetune_lr, self.ckpt_every, resume, True)


# ------------------------------------------------------------------------------------------------ pruner
class Pruner:
    """Base of every method: ``Pruner(config)`` or ``Pruner(**settings)``; :meth:`prune` does the work."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``vitprune prune --help``
    Config: ClassVar[type[PrunerConfig]] = PrunerConfig

    def __init__(self, config: PrunerConfig | None = None, /, **settings: Any) -> None:
        if config is not None and not isinstance(config, self.Config):
            raise VitPruneError(f"{self.name} needs a {self.Config.__name__}, got {type(config).__name__}")
        known = {f.name for f in fields(self.Config)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise VitPruneError(f"unknown {self.name} setting(s): {', '.join(unknown)}")
        self.config = replace(config, **settings) if config is not None else self.Config(**settings)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def check(self, model: nn.Module) -> None:
        """Raise :class:`VitPruneError` unless ``model`` can be pruned with this config (before any work)."""
        if not isinstance(model, ViT):
            raise VitPruneError(f"{self.name} needs a vitprune ViT, got {type(model).__name__}")

    def calibration_images(self) -> int | None:
        """How many calibration images the method uses by default (None: it streams the training data)."""
        return None

    def prune(
        self,
        model: nn.Module,
        data: Any,
        teacher: nn.Module | None = None,
        *,
        workdir: str | Path | None = None,
        resume: bool = False,
        device: str | torch.device = "cpu",
        eval_fn: EvalFn | None = None,
    ) -> PruneResult | list[PruneResult]:
        """Prune a copy of ``model`` (left unchanged) with batches from ``data`` (a loader or :class:`PruneData`).

        ``teacher`` (distillation) defaults to the dense ``model``; ``workdir`` holds resumable state
        (``resume=True`` continues it); ``eval_fn(model) -> dict`` scores the dense and pruned models for the
        report.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- helpers
    def _finetune(
        self,
        model: nn.Module,
        data: PruneData,
        teacher: nn.Module | None,
        workdir: Path | None,
        resume: bool,
        device: torch.device,
        masks: dict[str, Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Distillation fine-tuning of the pruned model (unstructured masks held at zero); None when 0 steps."""
        cfg = self.config
        if cfg.finetune_steps <= 0:
            return None
        from vitprune.training.engine import Trainer
        from vitprune.training.masks import WeightMasks

        trainer = Trainer(
            model,
            cfg.finetune_config(resume),
            data.train,
            teacher=teacher,
            out_dir=workdir,
            device=device,
            masks=WeightMasks(masks) if masks else None,
        )
        return {k: v for k, v in trainer.fit().items() if k != "config"}


def _restore_flags(model: nn.Module) -> Callable[[], None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    mode = model.training

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)

    return restore


def _workdir(workdir: str | Path | None) -> Path | None:
    if workdir is None:
        return None
    from vitprune.training import distributed as D

    path = Path(workdir)
    if D.is_main_process():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VitPruneError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# ------------------------------------------------------------------------------------------------ structural
TARGET_HELP = "keep this fraction of the dense {}, in (0, 1]"


@dataclass
class StructuralConfig(PrunerConfig):
    """Targets, selection and training settings every structural method shares."""

    target_macs: float | None = setting(
        None, kind="float", low=0, high=1, low_open=True, nullable=True, group="target", help=TARGET_HELP.format("MACs")
    )
    target_params: float | None = setting(
        None, kind="float", low=0, high=1, low_open=True, nullable=True, group="target", help=TARGET_HELP.format("params")
    )
    target_latency: float | None = setting(
        None, kind="float", low=0, high=1, low_open=True, nullable=True, group="target",
        help=TARGET_HELP.format("latency predicted by --lut"),
    )  # fmt: skip
    lut: str | None = setting(None, kind="str", nullable=True, metavar="FILE", help="latency table (vitprune lut build)")
    lut_device: str | None = setting(None, kind="str", nullable=True, help="device the table must match (default: --device)")
    lut_batch: int | None = setting(None, kind="int", low=1, nullable=True, help="batch size the table must match")
    lut_dtype: str | None = setting(None, kind="str", nullable=True, help="dtype the table must match")
    lut_threads: int | None = setting(None, kind="int", low=1, nullable=True, help="CPU threads the table must match")
    force_lut: bool = setting(False, help="use a table built for another setting (warn only)")
    kinds: tuple[str, ...] = setting(
        ("heads", "qk", "v", "mlp", "emb", "block"), kind="strs",
        choices=("heads", "qk", "v", "mlp", "emb", "block"), help="structures that may be removed",
    )  # fmt: skip
    selection: str = setting("greedy", choices=("greedy", "threshold", "uniform"), help="global selection rule")
    criterion: str = setting("saliency", choices=("saliency", "per_cost"), help="greedy: score, or score per cost saved")
    chunks: dict[str, int] = setting(
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

    # ------------------------------------------------------------------------------------------- method hooks
    def scores(
        self, student: ViT, batches: Iterator, teacher: nn.Module, round_index: int, device: torch.device
    ) -> dict[str, Tensor]:
        """Per-unit scores keyed by :func:`~vitprune.structures.groups.unit_key` (low = removed first)."""
        raise NotImplementedError

    def prepare(
        self, student: ViT, data: PruneData, teacher: nn.Module, workdir: Path | None, resume: bool, device
    ) -> dict[str, Any]:
        """Work on the full model before the rounds (VTP: gates + L1 training); returns report entries."""
        return {}

    def before_surgery(self, student: ViT, masks: Any, data: PruneData, device: torch.device) -> Any:
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
            table.check_compatible(lut_device, cfg.lut_batch, cfg.lut_dtype, threads, force=cfg.force_lut)
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
        from vitprune.models.vit import GATE_NAMES

        leaves = set(GATE_NAMES)
        gates = sorted(
            n
            for n, t in [*model.named_buffers(), *model.named_parameters()]
            if t is not None and n.rsplit(".", 1)[-1] in leaves
        )
        if gates or any("parametrizations" in n for n, _ in model.named_parameters()):
            raise VitPruneError(f"model already carries gates ({(gates or ['parametrized'])[0]}, ...): prune them first")
        cfg = self.config
        lut = self._lut(model, torch.device(device))
        low = self.min_fraction(model.config, self.cost_model(model.config, lut))
        if low > cfg.target:
            raise VitPruneError(
                f"target {cfg.metric} fraction {cfg.target:g} is unreachable: removing every allowed structure "
                f"({','.join(cfg.kinds)}) leaves {low:.4f} of the dense {cfg.metric}"
            )

    # ------------------------------------------------------------------------------------------- selection
    def _select(self, dense, masks, scores, cost, latency, frac, state) -> list[dict[str, Any]]:
        from vitprune.pruners import selection as S

        cfg = self.config
        if cfg.selection == "greedy":
            removed, state["eta"] = S.greedy_select(
                dense, masks, scores, cfg, cost, frac * cost.dense, latency, state.get("eta")
            )
            return removed
        if cfg.selection == "threshold":
            gt = S.GlobalThreshold(dense, {k: v for k, v in scores.items() if _kind(k) in cfg.kinds}, cost, cfg.round_to)
            _, new, info = gt.select(frac)
            state["selection"] = info
        else:
            new, r = S.uniform_select(dense, scores, cfg.kinds, cost, frac, cfg.round_to)
            state["selection"] = {"kept_fraction": r, "kinds": list(cfg.kinds)}
        for key, mask in list(masks.items()):  # later rounds never bring a removed unit back
            mask &= new.get(key)
        return [state["selection"]]

    # ------------------------------------------------------------------------------------------- pipeline
    def prune(
        self,
        model: nn.Module,
        data: Any,
        teacher: nn.Module | None = None,
        *,
        workdir: str | Path | None = None,
        resume: bool = False,
        device: str | torch.device = "cpu",
        eval_fn: EvalFn | None = None,
    ) -> PruneResult:
        device = torch.device(device)
        self.check(model, device)
        restore = _restore_flags(model)
        try:
            return self._prune(model, as_data(data), teacher if teacher is not None else model, workdir, resume,
                               device, eval_fn)  # fmt: skip
        finally:
            restore()

    def _prune(self, model, data, teacher, workdir, resume, device, eval_fn) -> PruneResult:
        from vitprune.reports import arch_summary
        from vitprune.structures.masks import StructuralMasks, apply_masks
        from vitprune.structures.surgery import prune_model, resolve_masks
        from vitprune.training import distributed as D
        from vitprune.training.checkpoint import load_checkpoint, save_checkpoint

        cfg = self.config
        t0 = time.perf_counter()
        work = _workdir(workdir)
        main = D.is_main_process()
        state_path = work / STATE_NAME if work is not None else None
        if work is not None and not resume and main and state_path.exists():
            state_path.unlink()
        dense = copy.deepcopy(model.config)
        lut = self._lut(model, device)
        cost = self.cost_model(dense, lut)
        latency = CostModel(dense, "latency", lut, cfg.img_size) if lut is not None else None
        latency_aware = latency is not None and cfg.selection == "greedy" and (
            (cfg.eta is None and cfg.latency_weight > 0) or bool(cfg.eta)
        )
        report: dict[str, Any] = {
            "method": self.name,
            "type": self.kind,
            "paper": self.paper,
            "settings": cfg.to_dict(),
            "target": {"metric": cfg.metric, "fraction": cfg.target},
            "dense": arch_summary(dense, cfg.img_size),
        }
        if lut is not None:
            report["dense"]["latency_pred_ms"] = lut.predict(dense)
            report["lut"] = {k: lut.meta.get(k) for k in ("device_name", "dtype", "batch_size", "threads", "runtime")}
        if eval_fn is not None:
            report["dense"]["eval"] = run_eval(eval_fn, model)

        student = copy.deepcopy(model).to(device).requires_grad_(True)  # a frozen input model still gets scored
        teacher = teacher.to(device).eval()
        report |= self.prepare(student, data, teacher, work, resume, device)
        masks = StructuralMasks.all_kept(dense)
        history: list[dict[str, Any]] = []
        state: dict[str, Any] = {"eta": cfg.eta if latency_aware else None}
        scores: dict[str, Tensor] | None = None
        start = 0
        settings_json = json.dumps(cfg.to_dict(), sort_keys=True)
        if resume and state_path is not None and state_path.is_file():
            saved = load_checkpoint(state_path)
            if saved["settings"] != settings_json or saved["dense_config"] != dense.to_json():
                raise VitPruneError(f"cannot resume {work}: the model or the {self.name} settings differ from the run")
            masks = StructuralMasks.from_json(saved["masks"])
            apply_masks(student, masks)
            student.load_state_dict(saved["model"])
            history, scores, start = json.loads(saved["history"]), saved["scores"], saved["round"]
            state = json.loads(saved["state"])
        apply_masks(student, masks)

        batches = cycle(data.calib)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.prune_steps, initial=start, desc=self.name, disable=not (cfg.progress and main))
        try:
            for step in range(start, cfg.prune_steps):
                frac = 1.0 - (1.0 - cfg.target) * (step + 1) / cfg.prune_steps
                t_step = time.perf_counter()
                scores = self.scores(student, batches, teacher, step, device)
                removed = self._select(dense, masks, scores, cost, latency if latency_aware else None, frac, state)
                apply_masks(student, masks)
                record = self._record(step, frac, masks, removed, dense, cost, lut)
                record["time_s"] = round(time.perf_counter() - t_step, 2)
                if cfg.train_steps_between > 0 and step < cfg.prune_steps - 1:
                    from vitprune.training.engine import Trainer

                    trainer = Trainer(student, cfg.between_config(), data.train, teacher=teacher, device=device)
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
        if eval_fn is not None:
            report["masked_eval"] = run_eval(eval_fn, student)

        fold_state = self.before_surgery(student, masks, data, device)
        final, rounding = resolve_masks(student, masks, cfg.round_to, scores)
        small = prune_model(student, final).to(device)
        report["rounding"] = rounding
        report |= self.after_surgery(small, fold_state)
        if eval_fn is not None:
            report["pruned_before_finetune_eval"] = run_eval(eval_fn, small)
        ft = self._finetune(small, data, teacher, work / "finetune" if work else None, resume, device)
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
        if eval_fn is not None:
            report["pruned"]["eval"] = run_eval(eval_fn, small)
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


def _kind(key: str) -> str:
    from vitprune.structures.groups import parse_key

    return parse_key(key)[0]


# ------------------------------------------------------------------------------------------------ unstructured
@dataclass
class UnstructuredConfig(PrunerConfig):
    """Sparsity targets (a sweep) and N:M, shared by every unstructured method."""

    sparsity: tuple[float, ...] = setting(
        (), kind="floats", nargs="+", low=0.0, high=1.0, high_open=True, nullable=True, help="target sparsities, e.g. 0.5 0.6 0.7"
    )
    nm: str | None = setting(None, kind="str", nullable=True, metavar="N:M", help="keep N of every M inputs (2:4)")
    patterns: tuple[str, ...] = setting(
        DEFAULT_PATTERNS, kind="strs", help="prunable linears (fnmatch patterns of module names)"
    )

    def check(self) -> None:
        from vitprune.pruners.calibration import parse_nm

        if isinstance(self.nm, (tuple, list)):
            self.nm = f"{int(self.nm[0])}:{int(self.nm[1])}"
        parse_nm(self.nm)

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        from vitprune.pruners.calibration import parse_nm

        return parse_nm(self.nm)

    @property
    def targets(self) -> list[float]:
        nm = self.nm_pair
        return [(nm[1] - nm[0]) / nm[1]] if nm is not None else [float(s) for s in self.sparsity]


class UnstructuredPruner(Pruner):
    """One sparsify pass for every target of the sweep, then optional masked fine-tuning of each result."""

    kind = "unstructured"
    Config: ClassVar[type[UnstructuredConfig]] = UnstructuredConfig

    def sparsify(self, model: nn.Module, calib: Iterable | None, device: torch.device) -> dict[float, Any]:
        """``{target: SparsePruneResult}`` for every target of the config (pruned copies; ``model`` unchanged)."""
        raise NotImplementedError

    def check(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        from vitprune.pruners.calibration import find_linears

        if self.config.nm is None and not self.config.sparsity:
            raise VitPruneError("give --sparsity (one or more targets) or --nm")
        linears = find_linears(model, self.config.patterns)
        if not linears:
            raise VitPruneError(f"no prunable linear layers match {', '.join(self.config.patterns)}")
        nm = self.config.nm_pair
        if nm is not None:
            for name, lin in linears.items():
                if lin.in_features % nm[1]:
                    raise VitPruneError(
                        f"N:M {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; {name} has {lin.in_features}"
                    )

    def prune(
        self,
        model: nn.Module,
        data: Any,
        teacher: nn.Module | None = None,
        *,
        workdir: str | Path | None = None,
        resume: bool = False,
        device: str | torch.device = "cpu",
        eval_fn: EvalFn | None = None,
    ) -> list[PruneResult]:
        device = torch.device(device)
        self.check(model, device)
        restore = _restore_flags(model)
        try:
            return self._prune(model, as_data(data), teacher, _workdir(workdir), resume, device, eval_fn)
        finally:
            restore()

    def _prune(self, model, data, teacher, work, resume, device, eval_fn) -> list[PruneResult]:
        t0 = time.perf_counter()
        dense_eval = run_eval(eval_fn, model)
        results = self.sparsify(model, data.calib, device)
        out = []
        teacher = teacher if teacher is not None else model
        for target, res in results.items():
            report = {"method": self.name, "type": self.kind, "paper": self.paper, "settings": self.config.to_dict()}
            report |= dict(res.report)
            if dense_eval is not None:
                report["dense_eval"] = dense_eval
                report["eval"] = run_eval(eval_fn, res.model)
            sub = work / f"finetune-s{target:.2f}" if work is not None else None
            ft = self._finetune(res.model, data, teacher, sub, resume, device, masks=res.masks)
            if ft is not None:
                report["finetune"] = ft
                report["before_finetune_eval"] = report.pop("eval", None)
                if eval_fn is not None:
                    report["eval"] = run_eval(eval_fn, res.model)
            res.model.eval()
            report["time_s"] = round(time.perf_counter() - t0, 2)
            out.append(PruneResult(res.model, res.masks, _jsonable(report), target))
        return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


__all__ = [
    "PruneData",
    "PruneResult",
    "Pruner",
    "PrunerConfig",
    "StructuralConfig",
    "StructuralPruner",
    "UnstructuredConfig",
    "UnstructuredPruner",
    "as_data",
    "cycle",
    "run_eval",
]
