"""Magnitude, Wanda and SparseGPT baselines against exact / slow references."""

import pytest
import torch

from vitprune.errors import VitPruneError
from vitprune.pruners.baselines import (
    magnitude_masks,
    nm_mask,
    prune_baseline,
    sparsegpt_prune,
    wanda_mask,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(n=8, batch=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_global_and_uniform_magnitude_exact():
    torch.manual_seed(0)
    weights = {"a": torch.randn(4, 6), "b": torch.randn(3, 5) * 3}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    k = round(0.4 * flat.numel())
    thresh = flat.sort().values[k - 1]
    glob = magnitude_masks(weights, 0.4, "global")
    for n, w in weights.items():
        assert torch.equal(glob[n], w.abs() > thresh)
    uni = magnitude_masks(weights, 0.4, "layer")
    for n, w in weights.items():
        kk = round(0.4 * w.numel())
        assert torch.equal(uni[n], w.abs() > w.abs().flatten().sort().values[kk - 1])
    assert (~glob["a"]).sum() > (~uni["a"]).sum()  # global takes more from the small-magnitude layer


def test_nm_masks_keep_n_largest_per_group():
    torch.manual_seed(1)
    w = torch.randn(3, 8)
    keep = nm_mask(w.abs(), (2, 4))
    for r in range(3):
        for g in range(2):
            grp = w[r, 4 * g : 4 * g + 4].abs()
            assert set(torch.nonzero(keep[r, 4 * g : 4 * g + 4]).flatten().tolist()) == set(
                grp.topk(2).indices.tolist()
            )
    with pytest.raises(VitPruneError, match="multiple of 4"):
        nm_mask(torch.randn(2, 6), (2, 4))


def test_wanda_exact():
    torch.manual_seed(2)
    w, x = torch.randn(4, 6), torch.randn(50, 6) * torch.tensor([1.0, 5, 0.1, 2, 1, 3])
    sq = x.pow(2).sum(0)
    keep = wanda_mask(w, sq, 0.5)
    for r in range(4):
        score = [abs(w[r, j].item()) * x[:, j].norm().item() for j in range(6)]
        pruned = sorted(range(6), key=lambda j: score[j])[:3]
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(pruned)


def slow_sparsegpt(w, h, sparsity, blocksize, damp, nm=None):
    """Reference: per-row sequential OBS over columns with the inverse of H on the columns not yet processed,
    each inverse computed directly (no Cholesky), masks chosen as in SparseGPT (per column block / per N:M group)."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    h.diagonal().add_(damp * h.diagonal().mean())
    keep = torch.ones(rows, cols, dtype=torch.bool)

    def d(c):
        return torch.linalg.inv(h[c:, c:])[0, 0]

    for j in range(cols):
        hinv = torch.linalg.inv(h[j:, j:])
        if nm is None and j % blocksize == 0:
            blk = list(range(j, min(j + blocksize, cols)))
            score = w[:, blk].pow(2) / torch.stack([d(c) for c in blk])[None]
            k = round(sparsity * score.numel())
            flat = torch.ones(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort(stable=True)[:k]] = False
            keep[:, blk] = flat.view(score.shape)
        if nm is not None and j % nm[1] == 0:
            grp = list(range(j, j + nm[1]))
            score = w[:, grp].pow(2) / torch.stack([d(c) for c in grp])[None]
            kk = torch.zeros_like(score, dtype=torch.bool)
            kk.scatter_(1, score.topk(nm[0], dim=1).indices, True)
            keep[:, grp] = kk
        for r in range(rows):
            if not keep[r, j]:
                w[r, j + 1 :] -= w[r, j] / hinv[0, 0] * hinv[0, 1:]
                w[r, j] = 0.0
    return w, keep


@pytest.mark.parametrize("nm,blocksize", [(None, 4), (None, 12), ((2, 4), 8)])
def test_sparsegpt_equals_slow_reference(nm, blocksize):
    torch.manual_seed(3)
    x = torch.randn(40, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    w = torch.randn(5, 12, dtype=torch.float64)
    h = x.T @ x
    got_w, got_keep = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=blocksize, damp=0.01)
    ref_w, ref_keep = slow_sparsegpt(w, h, 0.5, blocksize, 0.01, nm)
    assert torch.equal(got_keep, ref_keep)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-9, atol=1e-10)
    assert torch.all(got_w[~got_keep] == 0)
    assert (~got_keep).sum() == 30


def test_sparsegpt_beats_magnitude_on_layer_output():
    torch.manual_seed(4)
    x = torch.randn(200, 16) @ torch.randn(16, 16)
    w = torch.randn(8, 16)
    new, _ = sparsegpt_prune(w, x.T @ x, 0.5, blocksize=16)
    mag = w * magnitude_masks({"w": w}, 0.5, "layer")["w"]
    assert (x @ (new - w).T).norm() < (x @ (mag - w).T).norm()


@pytest.mark.parametrize("method", ["gm", "um", "wanda", "sparsegpt"])
def test_prune_baseline_end_to_end(tiny_model, method):
    results = prune_baseline(tiny_model, method, [0.5, 0.7], loader=_loader(), num_samples=8)
    assert set(results) == {0.5, 0.7}
    for target, res in results.items():
        params = dict(res.model.named_parameters())
        assert len(res.masks) == 16
        for name, keep in res.masks.items():
            assert keep.dtype == torch.bool and keep.shape == params[name].shape
            assert torch.all(params[name][~keep] == 0)
        assert res.report["sparsity"] == pytest.approx(target, abs=0.01)
    assert torch.equal(tiny_model.blocks[0].attn.qkv.weight, tiny_model.blocks[0].attn.qkv.weight)  # untouched
    assert not torch.equal(results[0.5].model.blocks[0].mlp.fc1.weight, tiny_model.blocks[0].mlp.fc1.weight)


def test_wanda_is_block_sequential(tiny_model):
    """Block 1's qkv statistics come from the inputs produced by the already-pruned block 0."""
    loader = _loader()
    res = prune_baseline(tiny_model, "wanda", [0.5], loader=loader, num_samples=8)[0.5]
    seen = []
    handle = res.model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for x, _ in loader:
            res.model(x)
    handle.remove()
    sq = torch.cat(seen).double().pow(2).sum(0)
    dense_w = tiny_model.blocks[1].attn.qkv.weight
    assert torch.equal(res.masks["blocks.1.attn.qkv.weight"], wanda_mask(dense_w, sq, 0.5))


def test_prune_baseline_nm_and_errors(tiny_model):
    res = prune_baseline(tiny_model, "sparsegpt", [], loader=_loader(), num_samples=8, nm=(2, 4), blocksize=16)
    (target,) = res
    assert target == 0.5
    keep = res[0.5].masks["blocks.0.mlp.fc2.weight"]
    assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2)
    with pytest.raises(VitPruneError, match="unknown pruning method"):
        prune_baseline(tiny_model, "random", [0.5])
    with pytest.raises(VitPruneError, match="calibration data"):
        prune_baseline(tiny_model, "wanda", [0.5])
    with pytest.raises(VitPruneError, match="sparsity"):
        prune_baseline(tiny_model, "gm", [1.5])
