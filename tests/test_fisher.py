"""Block-diagonal empirical Fisher inverse against direct inverses."""

import pytest
import torch

import vitprune.scoring.fisher as fisher_mod
from vitprune.errors import VitPruneError
from vitprune.scoring.fisher import (
    BlockFisherInverse,
    BlockLayout,
    FisherInverses,
    dense_block_fisher_inverse,
    fisher_memory_bytes,
    plan_block_size,
    woodbury_update_,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _close(blocks, ref, rtol=1e-6, atol=1e-9):
    assert len(blocks) == len(ref)
    for got, want in zip(blocks, ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def test_layout_tiles_with_remainder():
    lay = BlockLayout(50, 16)
    assert lay.groups == [(3, 16), (1, 2)]
    flat = torch.arange(50.0).repeat(2, 1)
    parts = lay.split(flat)
    assert [tuple(p.shape) for p in parts] == [(2, 3, 16), (2, 1, 2)]
    assert torch.equal(lay.merge(parts), flat)
    assert torch.equal(parts[0][0, 1], torch.arange(16.0, 32.0))


@pytest.mark.parametrize("mode,chunk", [("accumulate", 7), ("woodbury", 1), ("woodbury", 7)])
def test_inverse_matches_direct(mode, chunk):
    torch.manual_seed(0)
    m, numel, damp = 40, 50, 1e-3
    grads = torch.randn(m, numel, dtype=torch.float64) * 0.1
    est = BlockFisherInverse(numel, 16, m, damp, mode=mode, dtype=torch.float64)
    for start in range(0, m, chunk):
        est.update(grads[start : start + chunk])
    est.finalize()
    assert est.count == m
    _close(est.blocks, dense_block_fisher_inverse(grads, 16, damp))


def test_float32_accumulate_with_paper_damping():
    """lambda = 1e-8 (paper) and fewer gradients than the block size: still the right inverse in float32."""
    torch.manual_seed(1)
    grads = torch.randn(64, 96) * 1e-2
    est = BlockFisherInverse(96, 32, 64, 1e-8)
    est.update(grads)
    est.finalize()
    ref = dense_block_fisher_inverse(grads, 32, 1e-8)
    for got, want in zip(est.blocks, ref, strict=True):
        assert torch.allclose(got.double(), want.float().double(), rtol=1e-3, atol=1e-3 * want.abs().max())


def test_relative_dampening():
    torch.manual_seed(4)
    grads = torch.randn(30, 40, dtype=torch.float64) * 1e-3
    est = BlockFisherInverse(40, 16, 30, 0.05, dtype=torch.float64, relative=True)
    est.update(grads)
    est.finalize()
    lam = 0.05 * grads.pow(2).mean().item()  # mean diagonal of (1/m) sum g g^T
    assert est.lam == pytest.approx(lam)
    _close(est.blocks, dense_block_fisher_inverse(grads, 16, lam))
    with pytest.raises(VitPruneError, match="relative"):
        BlockFisherInverse(40, 16, 30, 0.05, mode="woodbury", relative=True)


def test_woodbury_fold_equals_sequential_sherman_morrison():
    torch.manual_seed(2)
    b, k, m = 9, 5, 20
    finv0 = torch.linalg.inv(
        torch.randn(b, b, dtype=torch.float64) @ torch.randn(b, b, dtype=torch.float64).T
        + b * torch.eye(b, dtype=torch.float64)
    )
    g = torch.randn(b, k, dtype=torch.float64)
    seq = finv0.clone()
    for i in range(k):  # the paper's update, one gradient at a time
        u = seq @ g[:, i]
        seq = seq - torch.outer(u, u) / (m + g[:, i] @ u)
    folded = finv0.clone()[None]
    woodbury_update_(folded, g[None], m)
    torch.testing.assert_close(folded[0], seq, rtol=1e-10, atol=1e-12)


def test_memory_estimate_and_planning():
    numels = [1000, 300]
    assert fisher_memory_bytes(numels, 100) == (10 * 100 * 100 + 3 * 100 * 100) * 4
    assert fisher_memory_bytes([130], 64) == (2 * 64 * 64 + 2 * 2) * 4
    assert plan_block_size(numels, 100, None) == 100
    with pytest.raises(VitPruneError, match="GiB"):
        plan_block_size(numels, 100, max_bytes=1000 * 50 * 4 + 300 * 50 * 4)
    b = plan_block_size(numels, 100, max_bytes=1300 * 52 * 4, multiple_of=4, allow_smaller=True)
    assert b % 4 == 0 and b < 100 and fisher_memory_bytes(numels, b) <= 1300 * 52 * 4
    with pytest.raises(VitPruneError, match="multiple of 4"):
        plan_block_size(numels, 10, None, multiple_of=4)


def test_fisher_set_refuses_before_allocating():
    with pytest.raises(VitPruneError, match="limit"):
        FisherInverses.create({"a": 10**9}, 256, 8, 1e-6, max_bytes=2**30)


def test_statistics_all_reduced_across_ranks(monkeypatch):
    """Two ranks with identical data: the all-reduced estimate equals one rank with the gradients duplicated."""

    class TwoRanks:
        @staticmethod
        def is_distributed():
            return True

        @staticmethod
        def world_size():
            return 2

        @staticmethod
        def rank():
            return 0

        @staticmethod
        def all_reduce_sum_(t):
            if t.shape[0] == 2 and not t[1].any():  # all-gather buffer: rank 1 fills its own slot the same way
                t[1] = t[0]
                return t
            return t.mul_(2)

    torch.manual_seed(3)
    grads = torch.randn(12, 20, dtype=torch.float64)
    monkeypatch.setattr(fisher_mod, "D", TwoRanks)
    for mode in ("accumulate", "woodbury"):
        fs = FisherInverses.create({"w": 20}, 8, num_grads=24, damp=1e-2, mode=mode, dtype=torch.float64)
        fs.add({"w": grads[:6]})
        fs.add({"w": grads[6:]})
        fs.finalize()
        _close(fs["w"].blocks, dense_block_fisher_inverse(torch.cat([grads, grads]), 8, 1e-2))


def test_bad_settings_raise():
    with pytest.raises(VitPruneError, match="dampening"):
        BlockFisherInverse(10, 4, 4, 0.0)
    with pytest.raises(VitPruneError, match="Fisher mode"):
        BlockFisherInverse(10, 4, 4, 1e-3, mode="exact")
    est = BlockFisherInverse(10, 4, 4, 1e-3)
    with pytest.raises(VitPruneError, match="no gradients"):
        est.finalize()
