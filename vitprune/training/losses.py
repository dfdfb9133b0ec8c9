"""Training losses: cross-entropy with label smoothing and soft knowledge distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune.errors import VitPruneError


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against class indices ``(B,)`` or class probabilities ``(B, C)`` (mixup targets).

    Label smoothing ``eps`` replaces the target distribution ``t`` with ``(1 - eps) t + eps / C``.
    """
    if targets.ndim == logits.ndim and targets.shape != logits.shape:
        raise VitPruneError(f"soft targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if targets.ndim == logits.ndim:
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` averaged over the batch (Hinton et al. 2015, eq. 2)."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (t * t)


class DistillationLoss(nn.Module):
    """``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(z_s, y; label smoothing)``.

    This is the soft-distillation objective of Hinton et al. (2015) as used by DeiT (Touvron et al. 2021,
    eq. 1-2) and by the NViT/oViT fine-tuning recipes. ``alpha = 1`` needs no labels; without teacher logits
    the loss is the (label-smoothed) cross-entropy alone. ``targets`` may be class indices or soft targets
    (probabilities, e.g. from mixup/cutmix).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise VitPruneError(f"distillation alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise VitPruneError(f"distillation temperature must be positive, got {temperature}")
        if not 0.0 <= label_smoothing < 1.0:
            raise VitPruneError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        student_logits: Tensor,
        targets: Tensor | None = None,
        teacher_logits: Tensor | None = None,
    ) -> Tensor:
        if isinstance(student_logits, tuple):  # a distilled model in training mode: (cls, dist) heads
            student_logits = (student_logits[0] + student_logits[1]) / 2
        alpha = self.alpha if teacher_logits is not None else 0.0
        loss = student_logits.new_zeros((), dtype=torch.float32)
        if alpha > 0:
            if teacher_logits.shape[-1] != student_logits.shape[-1]:
                raise VitPruneError(
                    f"teacher has {teacher_logits.shape[-1]} classes but the student has {student_logits.shape[-1]}"
                )
            loss = loss + alpha * kd_kl(student_logits, teacher_logits.detach(), self.temperature)
        if alpha < 1:
            if targets is None:
                raise VitPruneError("labels are needed unless distilling with alpha = 1 from a teacher")
            ce = soft_cross_entropy(student_logits.float(), targets, self.label_smoothing)
            loss = loss + (1.0 - alpha) * ce
        return loss
