"""The ONE fixed recovery budget every pruning benchmark uses: distillation from the dense model.

:func:`recover` fine-tunes a pruned student with the training engine (:class:`~vitprune.training.engine.Trainer`,
AdamW, soft distillation ``alpha = 1``: ``T^2 KL(p_teacher || p_student)``, no labels used) on augmented
training images (random resized crop + horizontal flip, :func:`build_train_loader`), and stops at whichever
budget comes first: ``budget_images`` training images or ``budget_minutes`` of wall-clock training time. Both
consumed amounts are recorded.

Learning rate: linear warm-up then cosine decay to ``min_lr`` over the *budget progress*
``p = max(images_seen / budget_images, elapsed / budget_minutes)``, set before every optimizer step; so the
schedule is fully annealed whichever budget binds (a step-count cosine would be cut off at a high learning rate
when the minutes run out first).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import shared_data, shared_model
from torch import nn
from torch.utils.data import DataLoader, Subset

from vitprune.data import CachedImageFolder, CachedTrainTransform, ImageFolderDataset, make_loader
from vitprune.data.transforms import HALF
from vitprune.errors import VitPruneError
from vitprune.training import TrainConfig, Trainer, WeightMasks
from vitprune.training.augment import build_train_transform

# The defaults every benchmark shares (a benchmark records them with its results).
DEFAULTS: dict[str, Any] = {
    "batch_size": 64,
    "lr": 2e-4,
    "min_lr": 1e-6,
    "weight_decay": 0.05,
    "warmup_frac": 0.05,
    "grad_clip": 1.0,
    "temperature": 1.0,
    "crop_scale": (0.25, 1.0),
    "hflip": 0.5,
}


def build_train_loader(
    root: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
    batch_size: int = DEFAULTS["batch_size"],
    workers: int = 0,
    img_size: int = 224,
    crop_scale: tuple[float, float] = DEFAULTS["crop_scale"],
    hflip: float = DEFAULTS["hflip"],
    mean: Sequence[float] = HALF,
    std: Sequence[float] = HALF,
    limit_per_class: int | None = None,
    seed: int = 0,
    cache: bool | None = None,
    tune_per_class: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> DataLoader:
    """Shuffled, augmented loader of the shared train split (labels through the model's ``classes.txt``).

    Per image: random resized crop (area ``crop_scale``, aspect 3/4..4/3, bilinear) to ``img_size``, horizontal
    flip with probability ``hflip``, then ``(x - mean) / std`` (the shared model's mean = std = 0.5). Batches
    are full (``drop_last``), so ``images_seen = steps * batch_size`` exactly.

    ``cache`` (default: on for the shared train split, i.e. when ``root`` is None): the images are decoded once
    into a uint8 tensor file (:class:`CachedImageFolder`, in ``cache_dir`` or ``$VITPRUNE_CACHE_DIR`` /
    ``~/.cache/vitprune/images``) and augmented on tensors with the same random draws (outputs equal the PIL
    path's to float rounding); ``cache=False`` decodes the files for every sample. ``tune_per_class``: the first N
    files of every class (the tuning split, :func:`split_train`) are never trained on.
    """
    cache = root is None if cache is None else cache
    root = Path(root) if root is not None else shared_data() / "train"
    classes_file = Path(classes_file) if classes_file is not None else shared_model() / "classes.txt"
    if cache:
        tensor_tf = CachedTrainTransform(img_size, tuple(crop_scale), hflip=hflip, mean=mean, std=std)
        ds = CachedImageFolder(root, tensor_tf, classes_file, limit_per_class, cache_dir=cache_dir)
    else:
        transform = build_train_transform(
            img_size, mean=mean, std=std, scale=tuple(crop_scale), hflip=hflip, randaugment=None
        )
        ds = ImageFolderDataset(root, transform, classes_file, limit_per_class)
    n_all = len(ds)
    if tune_per_class:
        ds = Subset(ds, split_train(ds.samples, tune_per_class)[1])
    ds.augment = {  # recorded by recover()
        "random_resized_crop": {"size": img_size, "scale": list(crop_scale), "ratio": [3 / 4, 4 / 3]},
        "hflip": hflip,
        "mean": list(mean),
        "std": list(std),
        "data": str(root),
        "images": len(ds),
        "excluded_tuning_split": n_all - len(ds),
        "decoded_once": bool(cache),
    }
    if len(ds) < batch_size:
        raise VitPruneError(f"training set {root} has {len(ds)} images, fewer than one batch of {batch_size}")
    return make_loader(ds, batch_size, workers=workers, shuffle=True, drop_last=True, seed=seed)


def split_train(samples: Sequence[tuple[Any, int]], per_class: int) -> tuple[list[int], list[int]]:
    """(tuning indices: the first ``per_class`` files of every class in file order, the other indices)."""
    seen: dict[int, int] = {}
    tune, rest = [], []
    for i, (_path, label) in enumerate(samples):
        rank = seen.get(label, 0)
        seen[label] = rank + 1
        (tune if rank < per_class else rest).append(i)
    return tune, rest


def budget_lr(progress: float, lr: float, min_lr: float, warmup_frac: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup_frac`` of the budget, then cosine to ``min_lr`` at progress 1."""
    p = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0 and p < warmup_frac:
        return lr * p / warmup_frac
    t = (p - warmup_frac) / (1.0 - warmup_frac) if warmup_frac < 1 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


class BudgetSchedule:
    """Engine hooks: set the learning rate from the budget progress and stop when the minutes run out."""

    def __init__(self, total_steps: int, budget_s: float | None, lr: float, min_lr: float, warmup_frac: float) -> None:
        self.total_steps, self.budget_s = total_steps, budget_s
        self.lr, self.min_lr, self.warmup_frac = lr, min_lr, warmup_frac
        self.t0 = time.perf_counter()
        self.stopped_by = "images"

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def progress(self, steps_done: int) -> float:
        p = steps_done / self.total_steps
        if self.budget_s:
            p = max(p, self.elapsed_s() / self.budget_s)
        return p

    def _set_lr(self, trainer: Trainer, progress: float) -> None:
        value = budget_lr(progress, self.lr, self.min_lr, self.warmup_frac)
        for group in trainer.optimizer.param_groups:
            group["lr"] = value

    def pre_step(self, trainer: Trainer, step: int) -> None:
        """Before optimizer step ``step + 1``: its learning rate at the progress it completes."""
        self._set_lr(trainer, max(self.progress(step), (step + 1) / self.total_steps))

    def post_step(self, trainer: Trainer, step: int) -> None:
        if self.budget_s and self.elapsed_s() >= self.budget_s and step < self.total_steps:
            trainer.should_stop = True
            self.stopped_by = "minutes"
        self._set_lr(trainer, self.progress(step))  # what the engine logs for this step


RECOVERY_KEYS = ("lr", "min_lr", "weight_decay", "warmup_frac", "grad_clip", "temperature", "amp", "teacher_amp",
                 "feature_weight", "feature_blocks", "feature_block_map", "feature_emb_index")  # fmt: skip


def recover(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: DataLoader,
    budget_images: int,
    budget_minutes: float | None = None,
    *,
    masks: WeightMasks | None = None,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    resume: bool = False,
    **recipe: Any,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (in place) within the fixed budget; returns what was consumed.

    ``recipe``: any of :data:`RECOVERY_KEYS` (defaults: :data:`DEFAULTS`; ``amp="none"``, no feature loss).
    ``masks`` (unstructured pruning) are held exactly at zero by the engine. ``out_dir`` keeps the engine's
    metrics, checkpoint and final model; ``resume`` continues from its checkpoint (same weights as an
    uninterrupted run; a minutes budget restarts its clock). ``amp`` / ``teacher_amp`` set the student's /
    teacher's precision
    (``teacher_amp="bf16"`` runs only the teacher in bf16: AMX on recent Xeons, see
    ``benchmarks/recovery_throughput.py``); ``feature_weight > 0`` adds feature distillation
    (:mod:`vitprune.training.features`, maps as in :class:`TrainConfig`).
    Returns ``{"images_seen", "minutes", "steps", "stopped_by"
    ("images" | "minutes"), "budget_images", "budget_minutes", "batch_size", "images_per_s", "final_loss",
    "hyper": {...}}``.
    """
    unknown = sorted(set(recipe) - set(RECOVERY_KEYS))
    if unknown:
        raise VitPruneError(f"unknown recovery settings: {', '.join(unknown)}")
    r = {"amp": "none", "teacher_amp": None, "feature_weight": 0.0, "feature_blocks": "all"}
    r |= {"feature_block_map": None, "feature_emb_index": None}
    r |= {k: DEFAULTS[k] for k in RECOVERY_KEYS if k in DEFAULTS} | recipe
    lr, min_lr, warmup_frac, feature_weight = r["lr"], r["min_lr"], r["warmup_frac"], r["feature_weight"]
    if budget_images <= 0:
        raise VitPruneError(f"budget_images must be positive, got {budget_images}")
    if budget_minutes is not None and budget_minutes <= 0:
        raise VitPruneError(f"budget_minutes must be positive when given, got {budget_minutes}")
    if not 0.0 <= warmup_frac < 1.0:
        raise VitPruneError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    batch_size = train_loader.batch_size
    if not batch_size:
        raise VitPruneError("the training loader needs a fixed batch_size")
    steps = max(1, budget_images // batch_size)
    passed = ("weight_decay", "grad_clip", "amp", "teacher_amp", "feature_weight", "feature_blocks")
    passed += ("feature_block_map", "feature_emb_index")
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=min(min_lr, lr),
        warmup_steps=0,
        distill_alpha=1.0,
        distill_temperature=r["temperature"],
        seed=seed,
        **{k: r[k] for k in passed},
        log_every=max(1, steps // 50),
        progress=progress,
        resume=resume,
        overwrite=not resume,
        ckpt_every=max(1, steps // 10),
        tensorboard=False,
    )
    schedule = BudgetSchedule(steps, budget_minutes * 60.0 if budget_minutes else None, lr, min_lr, warmup_frac)
    trainer = Trainer(
        student,
        config,
        train_loader,
        teacher=teacher,
        masks=masks,
        out_dir=out_dir,
        device=device,
        hooks=[schedule.post_step],
        pre_step_hooks=[schedule.pre_step],
    )
    schedule.start()
    summary = trainer.fit()
    wall_s = schedule.elapsed_s()
    student.eval()
    images = int(summary["steps"]) * batch_size
    return {
        "images_seen": images,
        "minutes": wall_s / 60.0,
        "train_time_s": summary["train_time_s"],
        "steps": int(summary["steps"]),
        "stopped_by": schedule.stopped_by if summary["steps"] < steps else "images",
        "budget_images": int(budget_images),
        "budget_minutes": budget_minutes,
        "batch_size": batch_size,
        "images_per_s": images / wall_s if wall_s > 0 else None,
        "final_loss": summary["final_loss"],
        "augment": getattr(train_loader.dataset, "augment", None),
        "hyper": {
            "optimizer": "AdamW",
            "lr": lr,
            "min_lr": min_lr,
            "weight_decay": r["weight_decay"],
            "warmup_frac": warmup_frac,
            "schedule": "linear warm-up + cosine over max(images, minutes) budget progress",
            "grad_clip": r["grad_clip"],
            "loss": f"distillation alpha=1, T={r['temperature']} (no labels)"
            + (f" + {feature_weight} x feature MSE/var on blocks {r['feature_blocks']}" if feature_weight > 0 else ""),
            "amp": r["amp"],
            "teacher_amp": r["teacher_amp"],
            "seed": seed,
            "torch_threads": torch.get_num_threads(),
        },
    }
