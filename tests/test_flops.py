"""Analytic MACs / params against torch's FlopCounterMode and the module's own parameter count."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_flops, count_macs, count_params, format_count, params_breakdown
from vitprune.models import BlockConfig, ViT, ViTConfig, attach_gate, num_params, vit


# Without autograd, CPU attention runs the fused kernel aten._scaled_dot_product_flash_attention_for_cpu, which
# FlopCounterMode has no formula for (it would count 0 for Q K^T and attn @ V); map it to torch's own SDPA formula.
def _cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def counted_flops(model: ViT, batch: int, img: int | tuple[int, int]) -> int:
    h, w = (img, img) if isinstance(img, int) else img
    x = torch.randn(batch, model.config.in_chans, h, w)
    # FlopCounterMode's module tracker fails on a parameter view without grad_fn (the bias an emptied branch
    # returns), so count with frozen parameters.
    model.requires_grad_(False)
    # the analytic count is the architecture's: count without the zero padding the CPU kernel path adds
    with (
        mock.patch.object(vit, "PAD_TO_FUSED", False),
        torch.no_grad(),
        FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter,
    ):
        model(x)
    return counter.get_total_flops()


ARCHS = {
    "dense": dict(embed_dim=32, blocks=[BlockConfig(4, 8, 8, 64)] * 3, num_classes=10),
    "ragged_dist": dict(
        embed_dim=24,
        blocks=[BlockConfig(4, 8, 8, 64), BlockConfig(2, 4, 12, 40), BlockConfig(0, 0, 0, 24), BlockConfig(3, 8, 4, 0)],
        num_classes=7,
        distilled=True,
    ),
    "zero_qk_and_zero_v": dict(
        embed_dim=16,
        blocks=[BlockConfig(2, 0, 4, 8), BlockConfig(2, 4, 0, 8), BlockConfig(1, 16, 16, 32)],
        num_classes=5,
    ),
    "avgpool_no_cls": dict(
        embed_dim=16, blocks=[BlockConfig(2, 8, 8, 32)] * 2, num_classes=3, class_token=False, global_pool="avg"
    ),
    "avgpool_dist_4ch": dict(
        embed_dim=16,
        blocks=[BlockConfig(1, 8, 4, 16)],
        num_classes=3,
        distilled=True,
        global_pool="avg",
        in_chans=4,
        qkv_bias=False,
    ),
    "no_head": dict(embed_dim=16, blocks=[BlockConfig(2, 8, 8, 32)], num_classes=0),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_macs_match_flop_counter_exactly(name):
    """Every matmul / conv the forward pass runs is counted, and nothing else (exact equality)."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=8, **ARCHS[name])).eval()
    assert count_flops(model) * 2 == counted_flops(model, batch=2, img=32)


@pytest.mark.parametrize("img", [48, (40, 24), 35])
def test_macs_other_image_sizes(img):
    """Other input sizes (square, rectangular, not a patch multiple: the conv floors) and interpolated pos-embed."""
    torch.manual_seed(0)
    model = ViT(ViTConfig(img_size=32, patch_size=8, **ARCHS["ragged_dist"])).eval()
    assert count_flops(model, img_size=img) == counted_flops(model, batch=1, img=img)


def test_macs_closed_form_deit_tiny():
    """DeiT-Tiny / ViT-Tiny at 224 px: the well-known 1.26 GMACs, by hand for one block."""
    cfg = ViTConfig.uniform(embed_dim=192, depth=12, heads=3, num_classes=1000)
    macs = count_macs(cfg)
    n, d = 197, 192
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
    assert macs["per_block"][0]["total"] == block
    assert macs["patch_embed"] == 196 * 3 * 16 * 16 * d
    assert macs["head"] == d * 1000
    assert macs["total"] == macs["patch_embed"] + 12 * block + d * 1000
    assert macs["total"] == 1_253_683_200  # "1.3 GFLOPs" in the DeiT paper (which counts MACs)
    assert macs["tokens"] == 197


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_params_match_module(name):
    model = ViT(ViTConfig(img_size=32, patch_size=8, **ARCHS[name]))
    assert count_params(model) == num_params(model) == sum(p.numel() for p in model.parameters())
    parts = params_breakdown(model.config)
    assert parts["total"] == parts["embed"] + parts["head"] + parts["norm"] + sum(
        b["total"] for b in parts["per_block"]
    )
    for blk, pb in zip(model.blocks, parts["per_block"], strict=True):
        assert pb["total"] == sum(p.numel() for p in blk.parameters())
        assert pb["attn"] == sum(p.numel() for p in blk.attn.parameters())
        assert pb["mlp"] == sum(p.numel() for p in blk.mlp.parameters())


def test_params_vit_tiny_200_classes():
    """The shared reference model's documented size: 5,563,016 parameters."""
    cfg = ViTConfig.uniform(embed_dim=192, depth=12, heads=3, num_classes=200)
    assert count_params(cfg) == 5_563_016


def test_gates_do_not_change_counts(tiny_model):
    before = count_macs(tiny_model)["total"], count_params(tiny_model)
    tiny_model.blocks[0].attn.head_gate = torch.zeros(4)
    attach_gate(tiny_model.blocks[0].mlp, "gate", torch.ones(64), learnable=True)
    assert (count_macs(tiny_model)["total"], count_params(tiny_model)) == before


def test_bad_inputs():
    with pytest.raises(VitPruneError, match="expected a vitprune ViT"):
        count_macs(torch.nn.Linear(2, 2))
    with pytest.raises(VitPruneError, match="smaller than the patch size"):
        count_macs(ViTConfig.uniform(16, 1, 2, img_size=32, patch_size=8), img_size=4)


def test_format_count():
    assert format_count(5_563_016) == "5.56M"
    assert format_count(1_258_000_000, "MAC") == "1.26GMAC"
    assert format_count(12) == "12"
