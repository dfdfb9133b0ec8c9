import copy

import pytest
import torch

from vitprune import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig
from vitprune.structures import (
    Group,
    StructuralMasks,
    apply_masks,
    architecture_after,
    enumerate_groups,
    group_slices,
    random_masks,
    remove_masks,
    uniform_masks,
    zero_group,
)
from vitprune.structures.groups import emb_axes, param_names, qkv_rows


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
    with torch.no_grad():  # non-trivial biases / norms so every slice matters
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_param_names_match_model(tiny_config, ragged_config):
    for cfg in (tiny_config, ragged_config):
        assert sorted(param_names(cfg)) == sorted(n for n, _ in ViT(cfg).named_parameters())


def test_enumerate_counts(ragged_config):
    groups = enumerate_groups(ragged_config)
    c = ragged_config
    assert sum(g.kind == "heads" for g in groups) == sum(b.heads for b in c.blocks)
    assert sum(g.kind == "qk" for g in groups) == sum(b.qk_dim for b in c.blocks)
    assert sum(g.kind == "v" for g in groups) == sum(b.v_dim for b in c.blocks)
    assert sum(g.kind == "mlp" for g in groups) == sum(b.mlp_dim for b in c.blocks)
    assert sum(g.kind == "emb" for g in groups) == c.embed_dim
    assert sum(g.kind == "block" for g in groups) == c.depth
    with pytest.raises(VitPruneError, match="unknown group kind"):
        enumerate_groups(c, kinds=["neuron"])


def test_head_slices_follow_methods_table():
    cfg = ViTConfig(embed_dim=8, blocks=[BlockConfig(3, 2, 4, 6)], num_classes=2, img_size=16, patch_size=8)
    slices = {(s.name, s.dim): sorted(s.index.tolist()) for s in group_slices(cfg, Group("heads", 0, 1))}
    # q rows 2..3, k rows 6+2..6+3, v rows 12+4..12+7; proj input columns 4..7
    rows = [2, 3, 8, 9, 16, 17, 18, 19]
    assert slices == {
        ("blocks.0.attn.qkv.weight", 0): rows,
        ("blocks.0.attn.qkv.bias", 0): rows,
        ("blocks.0.attn.proj.weight", 1): [4, 5, 6, 7],
    }
    qk = {(s.name, s.dim): sorted(s.index.tolist()) for s in group_slices(cfg, Group("qk", 0, 1))}
    assert qk[("blocks.0.attn.qkv.weight", 0)] == [1, 3, 5, 7, 9, 11]
    v = {(s.name, s.dim): sorted(s.index.tolist()) for s in group_slices(cfg, Group("v", 0, 2))}
    assert v[("blocks.0.attn.qkv.weight", 0)] == [14, 18, 22]
    assert v[("blocks.0.attn.proj.weight", 1)] == [2, 6, 10]
    assert qkv_rows(cfg.blocks[0], "k", torch.tensor([2]), torch.tensor([0])).tolist() == [10]


def test_emb_axes_cover_every_embedding_axis(ragged_config):
    """Brute force: every parameter axis of size embed_dim (and only those) is an embedding axis."""
    model = ViT(ragged_config)
    axes = set(emb_axes(ragged_config))
    d = ragged_config.embed_dim
    for name, p in model.named_parameters():
        for dim, size in enumerate(p.shape):
            is_emb = (name, dim) in axes
            assert not is_emb or size == d, (name, dim)
            if size == d and not is_emb:  # a coincidental size match must be an inner width
                assert any(k in name for k in ("qkv", "proj.weight", "fc1", "fc2")), (name, dim)


def test_zeroed_emb_channel_stays_zero_on_residual_stream(ragged_config):
    model = _model(ragged_config)
    zero_group(model, Group("emb", None, 5))
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o[..., 5])) for blk in model.blocks]
    model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == ragged_config.depth
    assert all(torch.equal(s, torch.zeros_like(s)) for s in seen)


@pytest.mark.parametrize("kind", ["heads", "qk", "v", "mlp", "block"])
def test_zeroing_a_group_equals_masking_it(ragged_config, kind):
    """Zeroing a group's slices (groups.py) and gating it (masks.py) compute the same function."""
    x = torch.randn(2, 3, 32, 32)
    base = _model(ragged_config)
    groups = enumerate_groups(ragged_config, kinds=[kind])
    for g in groups[:: max(1, len(groups) // 6)]:
        zeroed = copy.deepcopy(base)
        zero_group(zeroed, g)
        masked = copy.deepcopy(base)
        masks = StructuralMasks.all_kept(ragged_config)
        masks.remove(g)
        apply_masks(masked, masks)
        torch.testing.assert_close(masked(x), zeroed(x), atol=1e-5, rtol=1e-5)


def test_masks_json_and_from_model_round_trip(ragged_config):
    masks = random_masks(ragged_config, torch.Generator().manual_seed(3), p=0.4, p_block=0.3)
    again = StructuralMasks.from_json(masks.to_json())
    assert again == masks
    model = _model(ragged_config)
    apply_masks(model, masks)
    assert StructuralMasks.from_model(model) == masks
    remove_masks(model)
    assert StructuralMasks.from_model(model) == StructuralMasks.all_kept(ragged_config)
    with pytest.raises(VitPruneError, match="only 0 and 1"):
        StructuralMasks.from_dict(masks.to_dict() | {"emb": "01x"})


def test_remove_masks_restores_dense_logits(tiny_config):
    model = _model(tiny_config)
    x = torch.randn(2, 3, 32, 32)
    dense = model(x)
    apply_masks(model, random_masks(tiny_config, torch.Generator().manual_seed(0), p=0.5))
    assert not torch.allclose(model(x), dense)
    remove_masks(model)
    assert torch.equal(model(x), dense)


def test_validate_rejects_wrong_shapes(tiny_config, ragged_config):
    masks = StructuralMasks.all_kept(ragged_config)
    with pytest.raises(VitPruneError, match="blocks"):
        masks.validate(ViTConfig.uniform(24, 2, 2, num_classes=3, img_size=32, patch_size=8))
    with pytest.raises(VitPruneError, match=r"blocks\.0\.heads"):
        StructuralMasks.all_kept(tiny_config).validate(
            ViTConfig.uniform(32, 4, 2, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
        )
    masks.emb[:] = False
    with pytest.raises(VitPruneError, match="every embedding channel"):
        masks.validate(ragged_config)


def test_architecture_after_keeps_scale_and_drops_blocks(tiny_config):
    masks = uniform_masks(tiny_config, heads=0.5, qk=0.25, v=0.5, mlp=0.5, emb=0.75)
    masks.blocks[1].keep = False
    masks.blocks[2].v[:] = False  # no V dim left: the attention collapses to heads=0
    arch = architecture_after(tiny_config, masks)
    assert arch.embed_dim == 24 and arch.depth == 3
    assert [(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in arch.blocks] == [
        (2, 2, 4, 32),
        (0, 0, 0, 32),
        (2, 2, 4, 32),
    ]
    assert all(b.scale == tiny_config.blocks[0].scale for b in arch.blocks)


def test_uniform_masks_keep_best_scores(tiny_config):
    scores = {"blocks.0.mlp": torch.arange(64.0).flip(0), "emb": torch.arange(32.0)}
    masks = uniform_masks(tiny_config, mlp=0.25, emb=0.5, scores=scores)
    assert torch.nonzero(masks.blocks[0].mlp).flatten().tolist() == list(range(16))
    assert torch.nonzero(masks.emb).flatten().tolist() == list(range(16, 32))
    assert torch.nonzero(masks.blocks[1].mlp).flatten().tolist() == list(range(16))


def test_apply_masks_multiplies_learnable_gates(tiny_model):
    from vitprune.models import attach_gate

    attach_gate(tiny_model.blocks[0].mlp, "gate", torch.full((64,), 0.5), learnable=True)
    masks = StructuralMasks.all_kept(tiny_model.config)
    masks.blocks[0].mlp[:10] = False
    apply_masks(tiny_model, masks)
    gate = tiny_model.blocks[0].mlp.gate
    assert isinstance(gate, torch.nn.Parameter)
    assert gate[:10].abs().sum() == 0 and torch.all(gate[10:] == 0.5)
