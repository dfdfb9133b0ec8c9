"""The one pruning interface: a pruner = a config dataclass + ``prune(model, data, teacher=None) -> PruneResult``.

In the spirit of ``torch.ao.pruning`` (a method is one small override) and Torch-Pruning (graph / importance /
pruner apart):

- :class:`Pruner` holds a validated config (:mod:`vitprune.pruners.settings` fields: the same fields generate
  the CLI options and the recipe schema) and runs ``prune``; it owns no I/O beyond resumable state in
  ``workdir`` (the final outputs are written by :func:`vitprune.pruners.output.write_results`).
- ``StructuralPruner`` (:mod:`vitprune.pruners.structural`) owns everything structural methods share: targets
  (MACs / params / LUT latency), the reachability check, rounds of *scores -> global selection against the
  budget* (:mod:`vitprune.pruners.selection`, costed by :class:`~vitprune.metrics.cost.CostModel`), optional
  training between rounds, surgery, optional fine-tuning, the report and resume. A method supplies only its
  ``scores`` (and optionally the ``prepare`` / ``before_surgery`` / ``after_surgery`` hooks).
- ``UnstructuredPruner`` (:mod:`vitprune.pruners.unstructured`) owns the sparsity targets (a *sweep* returns one
  result per target), optional masked fine-tuning and the report; a method supplies ``sparsify``.

Every method returns :class:`PruneResult` (or a list of them for a sweep).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.models.vit import ViT
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


@dataclass
class Run:
    """What one ``prune`` call runs with: data, teacher, resumable work directory, device, evaluation."""

    data: PruneData
    teacher: nn.Module
    workdir: Path | None = None
    resume: bool = False
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - an immutable default
    eval_fn: EvalFn | None = None

    def sub(self, name: str) -> Path | None:
        """``workdir/name`` (None without a work directory)."""
        return self.workdir / name if self.workdir is not None else None

    def eval(self, model: nn.Module) -> dict[str, Any] | None:
        return run_eval(self.eval_fn, model)


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
RECONSTRUCT_MODES = ("off", "sequential", "dense-inputs")  # the ``reconstruct`` setting (pruners/reconstruct.py)


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
    feature_weight: float = setting(
        0.0, low=0.0, flag="feature-distill", help="weight of residual-stream feature distillation in training (0: off)"
    )
    feature_blocks: str = setting("all", help="student blocks whose outputs are matched: all, last-K or 0,5,11")
    feature_norm: str = setting("var", choices=("var", "none"), help="feature MSE / teacher variance, or plain MSE")
    teacher_amp: str | None = setting(
        None, kind="str", nullable=True, choices=("none", "bf16", "fp16"), help="teacher precision (default: --amp)"
    )
    reconstruct: str = setting(
        "off", choices=RECONSTRUCT_MODES,
        help="closed-form reconstruction of the kept weights after selection (pruners/reconstruct.py)",
    )  # fmt: skip
    reconstruct_target: str | None = setting(
        None, kind="str", nullable=True, choices=("layer", "residual", "self"),
        help="what sequential reconstruction fits (default: residual for structural, layer for unstructured)",
    )  # fmt: skip
    reconstruct_images: int = setting(256, low=1, help="calibration images of the reconstruction")
    reconstruct_damping: float = setting(1e-3, low=0.0, help="ridge damping x mean diag(X^T X) of the solves")
    seed: int = setting(0, low=0, help="seed of scoring, sampling and training order")
    ckpt_every: int = setting(200, low=0, help="training checkpoint every N steps (resumable)")
    log_every: int = setting(50, low=0, help="training log line every N steps (0: off)")
    progress: bool = setting(True, flag="no-progress", help="no progress bars")

    def __post_init__(self) -> None:
        self.normalize()
        validate_settings(self)
        self.check()

    def normalize(self) -> None:
        """Accept convenient library forms before validation (subclasses extend)."""

    def check(self) -> None:
        """Cross-field checks after validation (subclasses extend)."""

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
            feature_weight=self.feature_weight,
            feature_blocks=self.feature_blocks,
            feature_norm=self.feature_norm,
            teacher_amp=self.teacher_amp,
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

    name: ClassVar[str] = ""  # the registry name
    label: ClassVar[str] = ""  # how tables and plots name it
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type[PrunerConfig]] = PrunerConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A registered method class takes its name, label and paper from its line in the registry."""
        super().__init_subclass__(**kwargs)
        from vitprune.pruners import REGISTRY

        for name, (target, label, paper) in REGISTRY.items():
            if target == f"{cls.__module__}:{cls.__qualname__}":
                cls.name, cls.label, cls.paper = name, label, paper

    @classmethod
    def summary(cls) -> str:
        """One line for ``vitprune prune --help``: the first line of the class docstring."""
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

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

    def check(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
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
        report. Every input is checked before any work; the caller's model keeps its weights, flags and mode.
        """
        device = torch.device(device)
        self.check(model, device)
        restore = restore_flags(model)
        teacher = teacher if teacher is not None else model
        try:
            return self.run(model, Run(as_data(data), teacher, workdir_path(workdir), resume, device, eval_fn))
        finally:
            restore()

    def run(self, model: nn.Module, run: Run) -> PruneResult | list[PruneResult]:
        """The method's work on a checked model (the structural / unstructured bases implement it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- helpers
    def _finetune(
        self, model: nn.Module, run: Run, sub: str, masks: dict[str, Tensor] | None = None
    ) -> dict[str, Any] | None:
        """Distillation fine-tuning of the pruned model (unstructured masks held at zero); None when 0 steps."""
        cfg = self.config
        if cfg.finetune_steps <= 0:
            return None
        from vitprune.training.engine import Trainer
        from vitprune.training.masks import WeightMasks

        trainer = Trainer(
            model,
            cfg.finetune_config(run.resume),
            run.data.train,
            teacher=run.teacher,
            out_dir=run.sub(sub),
            device=run.device,
            masks=WeightMasks(masks) if masks else None,
        )
        return {k: v for k, v in trainer.fit().items() if k != "config"}


def restore_flags(model: nn.Module) -> Callable[[], None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    mode = model.training

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(mode)

    return restore


def workdir_path(workdir: str | Path | None) -> Path | None:
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


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


__all__ = [
    "RECONSTRUCT_MODES",
    "EvalFn",
    "PruneData",
    "PruneResult",
    "Pruner",
    "PrunerConfig",
    "Run",
    "as_data",
    "cycle",
    "jsonable",
    "run_eval",
]
