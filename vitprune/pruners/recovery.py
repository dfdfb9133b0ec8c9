"""Distillation-training settings shared by the structural pruners (NViT between rounds, VTP sparsity training,
and both pruners' final fine-tuning), turned into :class:`~vitprune.training.engine.TrainConfig` in one place."""

from __future__ import annotations

from dataclasses import dataclass

from vitprune.training.engine import TrainConfig


@dataclass
class DistillTrainingSettings:
    """Optimiser, schedule and distillation settings of a pruner's training phases (METHODS.md section 6)."""

    finetune_steps: int = 0  # distillation steps of the smaller model
    lr: float = 1e-4  # training during pruning (NViT between rounds, VTP sparsity training)
    finetune_lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 0
    grad_clip: float = 1.0
    amp: str = "none"
    distill_alpha: float = 1.0  # 1: pure distillation from the dense model (no labels needed)
    distill_temperature: float = 1.0
    label_smoothing: float = 0.0
    round_to: int | None = 8  # kept QK / V / MLP / emb widths rounded up to a multiple (None: off)
    img_size: int | None = None  # image size the MACs are counted at (default: the model's)
    seed: int = 0
    ckpt_every: int = 0
    log_every: int = 50
    progress: bool = True

    def trainer_config(
        self, steps: int, lr: float, ckpt_every: int, resume: bool = False, overwrite: bool = False
    ) -> TrainConfig:
        """A :class:`TrainConfig` for one phase of ``steps`` steps at peak learning rate ``lr``."""
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
