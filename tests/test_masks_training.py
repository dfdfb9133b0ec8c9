"""Unstructured masks stay exactly zero through AdamW momentum and weight decay."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig
from vitprune.training import TrainConfig, Trainer, WeightMasks

CFG = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=4, img_size=16, patch_size=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and are not slowed by a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _loader(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


def _random_masks(model: ViT, density: float = 0.5) -> WeightMasks:
    g = torch.Generator().manual_seed(1)
    return WeightMasks(
        {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if p.ndim == 2}
    )


def test_apply_zeroes_exactly_and_validates():
    torch.manual_seed(0)
    model = ViT(CFG)
    masks = _random_masks(model)
    masks.apply(model)
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0)
        assert torch.all(params[name][m] != 0)
    assert 0.4 < masks.sparsity() < 0.6
    with pytest.raises(VitPruneError, match="does not have"):
        WeightMasks({"nope.weight": torch.ones(2, dtype=torch.bool)}).apply(model)
    with pytest.raises(VitPruneError, match="has shape"):
        WeightMasks({"head.weight": torch.ones(2, 2, dtype=torch.bool)}).apply(model)
    with pytest.raises(VitPruneError, match="boolean"):
        WeightMasks({"head.weight": torch.full((4, 16), 0.5)})
    assert WeightMasks({"head.weight": torch.ones(4, 16)})["head.weight"].dtype == torch.bool


def test_pruned_weights_stay_exactly_zero_through_many_adamw_steps():
    torch.manual_seed(0)
    model = ViT(CFG)
    masks = _random_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=60, lr=5e-3, weight_decay=0.5, warmup_steps=5, grad_clip=1.0, progress=False)
    Trainer(model, cfg, _loader(), masks=masks).fit()
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert torch.all(params[name][~m] == 0), name
        assert not torch.equal(params[name][m], before[name][m]), f"kept weights of {name} must train"


def test_masks_replaced_by_a_hook_mid_training_hold_despite_momentum():
    torch.manual_seed(0)
    model = ViT(CFG)
    late = _random_masks(model, density=0.3)
    seen = {}

    def hook(trainer: Trainer, step: int) -> None:
        if step == 10:  # AdamW moments of these weights are non-zero by now
            trainer.masks = late
            state = trainer.optimizer.state[dict(model.named_parameters())["blocks.0.mlp.fc1.weight"]]
            seen["exp_avg_zero"] = bool(torch.all(state["exp_avg"][~late["blocks.0.mlp.fc1.weight"]] == 0))
        if step > 10:
            p = dict(model.named_parameters())
            assert all(torch.all(p[n][~m] == 0) for n, m in late.items())

    cfg = TrainConfig(steps=30, lr=5e-3, weight_decay=0.1, progress=False)
    trainer = Trainer(model, cfg, _loader(), hooks=[hook])
    trainer.fit()
    assert seen["exp_avg_zero"]
    assert trainer.masks is late


def test_from_model_zeros_round_trip():
    torch.manual_seed(0)
    model = ViT(CFG)
    masks = _random_masks(model)
    masks.apply(model)
    again = WeightMasks.from_model_zeros(model, names=list(masks.masks))
    assert all(torch.equal(again[n], m) for n, m in masks.items())
    assert torch.equal(WeightMasks.from_state_dict(masks.state_dict())["head.weight"], masks["head.weight"])
