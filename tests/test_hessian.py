import copy

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from vitprune import VitPruneError
from vitprune.models import ViT, ViTConfig
from vitprune.scoring.hessian import HessianSaliency, compute_saliency, group_sums
from vitprune.structures import StructuralMasks, apply_masks, enumerate_groups, group_slices, zero_group


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _small(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=5, img_size=16, patch_size=8)
    return ViT(cfg).to(dtype).eval()


def test_group_sums_match_brute_force_loop(ragged_config):
    """Vectorised reductions == explicit sum of g*w over every slice groups.py lists, for every group."""
    torch.manual_seed(0)
    model = ViT(ragged_config)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    sums = group_sums(model, grads)
    params = dict(model.named_parameters())
    for g in enumerate_groups(ragged_config):
        brute = 0.0
        for s in group_slices(ragged_config, g):
            gw = (grads[s.name] * params[s.name]).detach()
            brute += gw.index_select(s.dim, s.index).double().sum().item()
        assert sums[g.key][g.index].item() == pytest.approx(brute, rel=1e-6, abs=1e-9), g


def test_scores_are_half_mean_square_over_batches():
    model = _small()
    acc = HessianSaliency(model)
    torch.manual_seed(1)
    per_batch = []
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        per_batch.append(group_sums(model, grads))
        acc.accumulate_grads(grads)
    scores = acc.scores()
    for key in scores:
        ref = 0.5 * torch.stack([b[key] for b in per_batch]).square().mean(0)
        torch.testing.assert_close(scores[key], ref)
    again = HessianSaliency(model)
    again.load_state_dict(acc.state_dict())
    torch.testing.assert_close(again.scores()["emb"], scores["emb"])


def _exact_fisher_saliency(model, x):
    """I(S) with the exact expectation over labels y ~ p(y|x), one image per 'batch' (weights sqrt(p))."""
    acc = HessianSaliency(model)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    c = probs.shape[1]
    for i in range(len(x)):
        logp = F.log_softmax(model(x[i : i + 1]), -1)[0]
        for y in range(c):
            gs = torch.autograd.grad(-logp[y], params, retain_graph=True)
            scale = (probs[i, y] * c).sqrt()
            acc.accumulate_grads({n: g * scale for n, g in zip(names, gs, strict=True)})
    return acc.scores(), probs


def _kl_after(model, probs, x, edit):
    m = copy.deepcopy(model)
    with torch.no_grad():
        edit(m)
        logq = F.log_softmax(m(x), -1)
    return (probs * (probs.log() - logq)).sum(-1).mean().item()


def test_saliency_is_the_second_order_loss_change():
    """At the dense point the distillation loss KL(teacher || student) has zero gradient and Hessian = Fisher, so
    KL(w - t*w_S) / t^2 -> I(S) = 1/2 E[(g_S . w_S)^2] as t -> 0 (NViT Sec. 3.2, METHODS.md 2)."""
    model = _small(dtype=torch.float64)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    scores, probs = _exact_fisher_saliency(model, x)
    t = 1e-2
    params = dict(model.named_parameters())
    for g in enumerate_groups(model.config)[::3]:

        def shrink(m, g=g):
            ps = dict(m.named_parameters())
            for s in group_slices(m.config, g):
                ps[s.name].index_copy_(s.dim, s.index, params[s.name].index_select(s.dim, s.index) * (1 - t))

        kl = _kl_after(model, probs, x, shrink)
        assert kl / t**2 == pytest.approx(scores[g.key][g.index].item(), rel=0.03), g


def test_saliency_ranks_true_loss_change_of_removal():
    """Removing whole groups is not infinitesimal, but the ranking must hold (Spearman over all groups)."""
    model = _small(seed=2, dtype=torch.float64)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    scores, probs = _exact_fisher_saliency(model, x)
    groups = enumerate_groups(model.config)
    true = [_kl_after(model, probs, x, lambda m, g=g: zero_group(m, g)) for g in groups]
    est = [scores[g.key][g.index].item() for g in groups]
    assert spearmanr(est, true)[0] > 0.9


def test_compute_saliency_modes_and_masks():
    model = _small(seed=3)
    teacher = copy.deepcopy(model)
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(2)]
    labels = compute_saliency(model, data, mode="labels", progress=False)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in labels.values())
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched
    # distill: the KL gradient vanishes at the dense point, sampled teacher labels still give a signal
    images_only = [x for x, _ in data]
    distill = compute_saliency(model, images_only, mode="distill", teacher=teacher, progress=False)
    assert distill["emb"].sum() > 0
    with pytest.raises(VitPruneError, match="needs labelled"):
        compute_saliency(model, images_only, mode="labels", progress=False)
    with pytest.raises(VitPruneError, match="teacher"):
        compute_saliency(model, images_only, mode="distill", progress=False)
    with pytest.raises(VitPruneError, match="unknown saliency mode"):
        compute_saliency(model, data, mode="kl", progress=False)
    # masked units have zero gradient, hence zero saliency
    masks = StructuralMasks.all_kept(model.config)
    masks.blocks[0].mlp[:5] = False
    masks.blocks[1].heads[0] = False
    masks.emb[3] = False
    apply_masks(model, masks)
    s = compute_saliency(model, data, num_batches=1, mode="labels", progress=False)
    assert torch.all(s["blocks.0.mlp"][:5] == 0) and torch.all(s["blocks.0.mlp"][5:] > 0)
    assert s["blocks.1.heads"][0] == 0 and s["blocks.1.heads"][1] > 0
    assert s["emb"][3] == 0
