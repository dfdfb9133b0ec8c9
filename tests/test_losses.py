"""DistillationLoss against hand-computed references (Hinton et al. 2015; DeiT eq. 1-2)."""

from __future__ import annotations

import math

import pytest
import torch

from vitprune.errors import VitPruneError
from vitprune.training.losses import DistillationLoss, kd_kl, soft_cross_entropy


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _reference(zs, zt, y, alpha, t, eps):
    """Plain-python loss: alpha * T^2 * mean_b KL(p_t || p_s) + (1 - alpha) * mean_b CE with smoothing."""
    kl_sum, ce_sum = 0.0, 0.0
    for s_row, t_row, label in zip(zs, zt, y, strict=True):
        ps, pt = _softmax(s_row, t), _softmax(t_row, t)
        kl_sum += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt, strict=True))
        p1 = _softmax(s_row)
        c = len(s_row)
        target = [(1 - eps) * (1.0 if j == label else 0.0) + eps / c for j in range(c)]
        ce_sum += -sum(q * math.log(p) for q, p in zip(target, p1, strict=True))
    n = len(zs)
    return alpha * t * t * kl_sum / n + (1 - alpha) * ce_sum / n


ZS = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.1, -1.0, 0.0], [-2.0, 1.5, 0.5, 0.7]]
ZT = [[0.5, 0.5, -0.2, 1.0], [1.2, -0.3, 0.0, 0.4], [-1.0, 2.5, 0.1, 0.2]]
Y = [3, 0, 1]


@pytest.mark.parametrize(("alpha", "t", "eps"), [(1.0, 1.0, 0.0), (0.5, 2.0, 0.1), (0.0, 4.0, 0.2), (0.3, 0.5, 0.0)])
def test_matches_hand_computed_reference(alpha, t, eps):
    loss = DistillationLoss(alpha=alpha, temperature=t, label_smoothing=eps)
    got = loss(torch.tensor(ZS), torch.tensor(Y), torch.tensor(ZT))
    assert got.item() == pytest.approx(_reference(ZS, ZT, Y, alpha, t, eps), rel=1e-5, abs=1e-6)


def test_alpha_one_needs_no_labels_and_is_zero_for_identical_logits():
    loss = DistillationLoss(alpha=1.0, temperature=3.0)
    z = torch.tensor(ZS)
    assert loss(z, None, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(z, None, torch.tensor(ZT)).item() > 0


def test_without_teacher_it_is_label_smoothed_cross_entropy():
    got = DistillationLoss(alpha=0.7, label_smoothing=0.1)(torch.tensor(ZS), torch.tensor(Y))
    assert got.item() == pytest.approx(_reference(ZS, ZS, Y, 0.0, 1.0, 0.1), rel=1e-6)


def test_soft_targets_equal_hard_targets_when_one_hot_and_mix_linearly():
    z = torch.tensor(ZS)
    y = torch.tensor(Y)
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert soft_cross_entropy(z, onehot, 0.1).item() == pytest.approx(soft_cross_entropy(z, y, 0.1).item(), rel=1e-6)
    y2 = torch.tensor([0, 1, 2])
    mixed = 0.3 * onehot + 0.7 * torch.nn.functional.one_hot(y2, 4).float()
    expect = 0.3 * soft_cross_entropy(z, y).item() + 0.7 * soft_cross_entropy(z, y2).item()
    assert soft_cross_entropy(z, mixed).item() == pytest.approx(expect, rel=1e-6)


def test_temperature_squared_scaling_of_kl():
    zs, zt = torch.tensor(ZS), torch.tensor(ZT)
    base = torch.nn.functional.kl_div(
        torch.log_softmax(zs / 2, -1), torch.log_softmax(zt / 2, -1), reduction="batchmean", log_target=True
    )
    assert kd_kl(zs, zt, 2.0).item() == pytest.approx(4.0 * base.item(), rel=1e-6)


def test_gradient_flows_to_student_only():
    zs = torch.tensor(ZS, requires_grad=True)
    zt = torch.tensor(ZT, requires_grad=True)
    DistillationLoss(alpha=0.5, temperature=2.0)(zs, torch.tensor(Y), zt).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_distilled_pair_is_averaged():
    zs, zt = torch.tensor(ZS), torch.tensor(ZT)
    loss = DistillationLoss(alpha=1.0)
    assert loss((zs, zs), None, zt).item() == pytest.approx(loss(zs, None, zt).item())


def test_errors():
    with pytest.raises(VitPruneError, match="teacher has 5 classes"):
        DistillationLoss(alpha=0.5)(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 5))
    with pytest.raises(VitPruneError, match="labels are needed"):
        DistillationLoss(alpha=0.5)(torch.zeros(2, 4), None, torch.zeros(2, 4))
    with pytest.raises(VitPruneError, match="do not match"):
        soft_cross_entropy(torch.zeros(2, 4), torch.zeros(2, 3))
    for kwargs in ({"alpha": 1.5}, {"temperature": 0.0}, {"label_smoothing": 1.0}):
        with pytest.raises(VitPruneError):
            DistillationLoss(**kwargs)
