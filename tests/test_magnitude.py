"""The structural magnitude baselines: L2 and Taylor group scores against brute force, the uniform selection,
and both pruners through the one interface (masked model == pruned model)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from vitprune import pruners
from vitprune.errors import VitPruneError
from vitprune.metrics.cost import CostModel
from vitprune.metrics.flops import count_macs
from vitprune.pruners.selection import uniform_select
from vitprune.scoring.magnitude import l2_group_scores, taylor_group_scores
from vitprune.structures.masks import apply_masks, architecture_after, uniform_masks
from vitprune.structures.surgery import prune_model, round_masks


def test_l2_group_scores_match_brute_force(tiny_model):
    """||w_S||_2 over the METHODS.md section 1 slices, computed by hand for one unit of every kind."""
    m, cfg = tiny_model, tiny_model.config
    scores = l2_group_scores(m, kinds=("heads", "qk", "v", "mlp", "emb"))
    b, blk = 2, m.blocks[2]
    h, dq, dv = cfg.blocks[b].heads, cfg.blocks[b].qk_dim, cfg.blocks[b].v_dim
    w, bias = blk.attn.qkv.weight.detach(), blk.attn.qkv.bias.detach()

    def norm(*parts: torch.Tensor) -> float:
        return math.sqrt(sum(float(p.double().pow(2).sum()) for p in parts))

    j = 3  # QK dim j: row j of q and of k in every head
    rows = [hh * dq + j for hh in range(h)] + [h * dq + hh * dq + j for hh in range(h)]
    assert scores[f"blocks.{b}.qk"][j].item() == pytest.approx(norm(w[rows], bias[rows]), rel=1e-5)
    j = 5  # V dim j: v rows in every head and the matching proj columns
    rows = [2 * h * dq + hh * dv + j for hh in range(h)]
    cols = [hh * dv + j for hh in range(h)]
    expect = norm(w[rows], bias[rows], blk.attn.proj.weight.detach()[:, cols])
    assert scores[f"blocks.{b}.v"][j].item() == pytest.approx(expect, rel=1e-5)
    hh = 1  # head: its q, k, v rows and its proj columns
    rows = [*range(hh * dq, (hh + 1) * dq), *range(h * dq + hh * dq, h * dq + (hh + 1) * dq)]
    rows += list(range(2 * h * dq + hh * dv, 2 * h * dq + (hh + 1) * dv))
    expect = norm(w[rows], bias[rows], blk.attn.proj.weight.detach()[:, hh * dv : (hh + 1) * dv])
    assert scores[f"blocks.{b}.heads"][hh].item() == pytest.approx(expect, rel=1e-5)
    j = 7  # MLP neuron: fc1 row and bias, fc2 column
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    expect = norm(fc1.weight.detach()[j], fc1.bias.detach()[j : j + 1], fc2.weight.detach()[:, j])
    assert scores[f"blocks.{b}.mlp"][j].item() == pytest.approx(expect, rel=1e-5)
    c = 4  # embedding channel: column/row c of every tensor on the residual stream
    sq = sum(
        float(p.detach().double().select(p.dim() - 1 if n in ("cls_token", "pos_embed") else 0, c).pow(2).sum())
        for n, p in m.named_parameters()
        if n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    )
    sq += sum(
        float(p.detach().double()[c].pow(2).sum())
        for n, p in m.named_parameters()
        if n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"))
        or n in ("norm.weight", "norm.bias")
        or n.endswith(("attn.proj.weight", "mlp.fc2.weight"))
    )
    sq += sum(
        float(p.detach().double()[:, c].pow(2).sum())
        for n, p in m.named_parameters()
        if n.endswith(("attn.qkv.weight", "mlp.fc1.weight")) or n == "head.weight"
    )
    assert scores["emb"][c].item() == pytest.approx(math.sqrt(sq), rel=1e-5)


def uniform_l2_masks(model, target, round_to=8):
    scores = l2_group_scores(model, ("qk", "v", "mlp"))
    masks, r = uniform_select(
        model.config, scores, ("qk", "v", "mlp"), CostModel(model.config, "macs"), target, round_to
    )
    return masks, scores, r


def test_uniform_l2_masks_meet_the_target_maximally(tiny_model):
    cfg = tiny_model.config
    dense = count_macs(cfg)["total"]
    masks, scores, r = uniform_l2_masks(tiny_model, 0.6, round_to=None)
    frac = count_macs(architecture_after(cfg, masks))["total"] / dense
    assert frac <= 0.6
    bigger = uniform_masks(cfg, qk=min(r + 1e-3, 1.0), v=min(r + 1e-3, 1.0), mlp=min(r + 1e-3, 1.0), scores=scores)
    assert count_macs(architecture_after(cfg, bigger))["total"] / dense > 0.6  # r is the largest such fraction
    for b, bm in enumerate(masks.blocks):  # the kept units are the highest-norm ones
        s = scores[f"blocks.{b}.mlp"]
        assert s[bm.mlp].min() >= s[~bm.mlp].max()
    masks8, scores8, _ = uniform_l2_masks(tiny_model, 0.6, round_to=8)
    rounded, _ = round_masks(cfg, masks8, 8, scores8)
    small = prune_model(tiny_model, masks8, round_to=8, scores=scores8)
    assert small.config == architecture_after(cfg, rounded)
    assert count_macs(small.config)["total"] / dense <= 0.6
    assert all(b.mlp_dim % 8 == 0 for b in small.config.blocks)
    with pytest.raises(VitPruneError, match="unreachable"):
        uniform_l2_masks(tiny_model, 0.01)


def _batches(model, n=3, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return [
        (
            torch.randn(bs, c.in_chans, c.img_size, c.img_size, generator=g),
            torch.randint(0, c.num_classes, (bs,), generator=g),
        )
        for _ in range(n)
    ]


def test_taylor_scores_match_autograd_brute_force(tiny_model):
    """sum_S |g w| with g the batch-averaged gradient of the CE loss, for an MLP neuron and a QK dim."""
    batches = _batches(tiny_model)
    scores = taylor_group_scores(tiny_model, iter(batches), 3, kinds=("qk", "mlp"))
    m = copy.deepcopy(tiny_model).eval()
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in m.named_parameters()}
    for x, y in batches:
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        for n, p in m.named_parameters():
            grads[n] += p.grad.double() / len(batches)
    blk, b, j = m.blocks[1], 1, 5
    gw = lambda name, idx: (grads[name][idx] * dict(m.named_parameters())[name].detach().double()[idx]).abs().sum()  # noqa: E731
    expect = gw(f"blocks.{b}.mlp.fc1.weight", (j,)) + gw(f"blocks.{b}.mlp.fc1.bias", (j,))
    expect += gw(f"blocks.{b}.mlp.fc2.weight", (slice(None), j))
    assert scores[f"blocks.{b}.mlp"][j].item() == pytest.approx(float(expect), rel=1e-4)
    h, dq = m.config.blocks[b].heads, m.config.blocks[b].qk_dim
    rows = [hh * dq + 2 for hh in range(h)] + [h * dq + hh * dq + 2 for hh in range(h)]
    expect = gw(f"blocks.{b}.attn.qkv.weight", (rows,)) + gw(f"blocks.{b}.attn.qkv.bias", (rows,))
    assert scores[f"blocks.{b}.qk"][2].item() == pytest.approx(float(expect), rel=1e-4)
    assert blk is m.blocks[1]


@pytest.mark.parametrize("method", ["l2", "taylor"])
@pytest.mark.parametrize("selection", ["uniform", "greedy", "threshold"])
def test_magnitude_pruners_masked_equals_pruned(tiny_model, method, selection):
    """Through the one interface: the target is met and the pruned model computes what the masked dense does."""
    res = pruners.create(method, target_macs=0.6, selection=selection, prune_steps=2, progress=False).prune(
        tiny_model, _batches(tiny_model)
    )
    assert res.report["pruned"]["fraction"]["macs"] <= 0.6 + 1e-9
    assert replace(res.model.config, extra={}) == architecture_after(tiny_model.config, res.masks)
    masked = apply_masks(copy.deepcopy(tiny_model), res.masks).eval()
    x = _batches(tiny_model, n=1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(res.model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(VitPruneError, match="unreachable"):
        pruners.create(method, target_macs=0.01, selection=selection, progress=False).check(tiny_model)
