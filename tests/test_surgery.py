import pytest
import torch

from vitprune import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig, attach_gate, load, num_params, save
from vitprune.structures import (
    StructuralMasks,
    apply_masks,
    architecture_after,
    prune_model,
    prune_model_with_report,
    random_masks,
)
from vitprune.structures.groups import unit_key


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids OpenMP spin contention on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = ViT(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _check_same(model, masks, x, check_config=True):
    apply_masks(model, masks)
    expected = model(x)
    pruned = prune_model(model, masks)
    if check_config:
        assert pruned.config == architecture_after(model.config, masks)
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    return pruned


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("cfg_name", ["tiny_config", "ragged_config"])
def test_pruned_model_equals_masked_model(cfg_name, seed, request):
    cfg = request.getfixturevalue(cfg_name)
    model = _model(cfg, seed)
    x = torch.randn(2, 3, 32, 32)
    masks = random_masks(cfg, torch.Generator().manual_seed(seed), p=0.35, p_block=0.25)
    pruned = _check_same(model, masks, x)
    assert num_params(pruned) < num_params(model)


@pytest.mark.parametrize("kind", ["heads", "qk", "v", "mlp", "emb"])
def test_each_kind_alone(ragged_config, kind):
    model = _model(ragged_config, 1)
    masks = StructuralMasks.all_kept(ragged_config)
    g = torch.Generator().manual_seed(2)
    for key, mask in masks.items():
        if key.endswith(kind):
            mask.copy_(torch.rand(mask.shape, generator=g) > 0.5)
    masks.emb[0] = True
    _check_same(model, masks, torch.randn(2, 3, 32, 32))


def test_all_heads_removed_keeps_proj_bias_and_removed_block_disappears(tiny_config):
    model = _model(tiny_config, 3)
    masks = StructuralMasks.all_kept(tiny_config)
    masks.blocks[0].heads[:] = False
    masks.blocks[1].mlp[:] = False
    masks.blocks[2].keep = False
    masks.blocks[3].qk[:] = False  # uniform attention, still exact
    pruned = _check_same(model, masks, torch.randn(2, 3, 32, 32))
    dims = [(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in pruned.config.blocks]
    assert dims == [(0, 0, 0, 64), (4, 8, 8, 0), (4, 0, 8, 64)]
    assert torch.equal(pruned.blocks[0].attn.proj.bias, model.blocks[0].attn.proj.bias)


def test_learnable_gates_are_folded(ragged_config):
    model = _model(ragged_config, 4)
    g = torch.Generator().manual_seed(0)
    for blk, cfg in zip(model.blocks, ragged_config.blocks, strict=True):
        attach_gate(blk.attn, "head_gate", torch.rand(cfg.heads, generator=g) + 0.2, learnable=True)
        attach_gate(blk.attn, "qk_gate", torch.rand(cfg.qk_dim, generator=g) + 0.2, learnable=True)
        attach_gate(blk.attn, "v_gate", torch.rand(cfg.v_dim, generator=g) + 0.2, learnable=True)
        attach_gate(blk.mlp, "gate", torch.rand(cfg.mlp_dim, generator=g) + 0.2, learnable=True)
        attach_gate(blk, "branch_gate", torch.rand(2, generator=g) + 0.2, learnable=True)
    x = torch.randn(2, 3, 32, 32)
    # no masks: folding alone
    expected = model(x)
    pruned = prune_model(model)
    assert pruned.config.blocks == ragged_config.blocks
    assert not any(n.endswith("gate") for n, _ in pruned.named_parameters())
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    # gates exactly zero count as removed, plus masks
    with torch.no_grad():
        model.blocks[0].mlp.gate[:7] = 0
    masks = random_masks(ragged_config, torch.Generator().manual_seed(1), p=0.3)
    pruned = _check_same(model, masks, x, check_config=False)
    assert pruned.config.blocks[0].mlp_dim == int(masks.blocks[0].mlp[7:].sum())


def test_round_to_multiple_keeps_best_extra_units():
    cfg = ViTConfig(embed_dim=48, blocks=[BlockConfig(2, 16, 24, 64)] * 2, num_classes=5, img_size=16, patch_size=8)
    model = _model(cfg, 5)
    masks = StructuralMasks.all_kept(cfg)
    masks.emb[:13] = False  # 35 kept -> 40
    masks.blocks[0].qk[:5] = False  # 11 -> 16 (full)
    masks.blocks[0].v[:3] = False  # 21 -> 24 (full)
    masks.blocks[1].mlp[:30] = False  # 34 -> 40
    masks.blocks[1].v[:] = False  # collapsed attention: stays 0
    scores = {unit_key("mlp", 1): torch.arange(64.0), "emb": torch.arange(48.0).flip(0)}
    pruned, report = prune_model_with_report(model, masks, round_to=8, scores=scores)
    b0, b1 = pruned.config.blocks
    assert pruned.config.embed_dim == 40
    assert (b0.heads, b0.qk_dim, b0.v_dim, b0.mlp_dim) == (2, 16, 24, 64)
    assert (b1.heads, b1.qk_dim, b1.v_dim, b1.mlp_dim) == (0, 0, 0, 40)
    added = report["rounding"]["added"]
    assert added["emb"]["units"] == [0, 1, 2, 3, 4]  # the highest emb scores among the removed 0..12
    assert added["blocks.1.mlp"]["units"] == [24, 25, 26, 27, 28, 29]  # highest mlp scores among removed
    # the rounded model equals the masked model with the rounded masks
    rounded = StructuralMasks.all_kept(cfg)
    rounded.emb[5:13] = False
    rounded.blocks[1].mlp[:24] = False
    rounded.blocks[1].v[:] = False
    rounded.blocks[1].heads[:] = False
    rounded.blocks[1].qk[:] = False
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(pruned(x), apply_masks(_model(cfg, 5), rounded)(x), atol=1e-5, rtol=1e-5)


def test_pruned_model_saves_and_reloads(tmp_path, ragged_config):
    model = _model(ragged_config, 6)
    masks = random_masks(ragged_config, torch.Generator().manual_seed(6), p=0.4)
    pruned = prune_model(apply_masks(model, masks))
    save(pruned, tmp_path / "p")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(load(tmp_path / "p").eval()(x), pruned(x))


def test_non_binary_emb_mask_refused(tiny_model):
    attach_gate(tiny_model, "emb_mask", torch.full((32,), 0.5))
    with pytest.raises(VitPruneError, match="emb_mask"):
        prune_model(tiny_model)
