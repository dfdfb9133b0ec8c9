"""OBS saliency, updates, greedy correlated removal and allocation against exhaustive exact OBS."""

import itertools

import pytest
import torch

from vitprune.scoring.obs import (
    allocate_counts,
    exact_removal_loss,
    greedy_obs,
    group_obs_update,
    obs_downdate,
    obs_saliency,
    obs_update,
    prefix_mask,
    replay_prefix,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(b: int, n: int = 1, seed: int = 0):
    """Random SPD Fisher blocks (few gradients + damping, like the real estimate), weights, inverses."""
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(n, b, b // 2 + 1, generator=g, dtype=torch.float64)
    fisher = grads @ grads.transpose(1, 2) / grads.shape[-1] + 0.05 * torch.eye(b, dtype=torch.float64)
    w = torch.randn(n, b, generator=g, dtype=torch.float64)
    return w, fisher, torch.linalg.inv(fisher)


def test_single_removal_formulas():
    w, fisher, finv = (t[0] for t in _problem(5))
    q = 2
    # OBS: the best single removal loss equals rho_q and the compensated weights are the constrained optimum
    rho = obs_saliency(w, finv.diagonal())
    mask = torch.zeros(5, dtype=torch.bool)
    mask[q] = True
    torch.testing.assert_close(rho[q], exact_removal_loss(w, fisher, mask))
    new = obs_update(w, finv, q)
    keep = [i for i in range(5) if i != q]
    dw = new - w
    torch.testing.assert_close(0.5 * dw @ fisher @ dw, rho[q])
    # downdate = inverse of F restricted to the remaining weights, zero row/column q
    down = obs_downdate(finv, q)
    torch.testing.assert_close(down[keep][:, keep], torch.linalg.inv(fisher[keep][:, keep]))
    assert down[q].abs().max() < 1e-12 and down[:, q].abs().max() < 1e-12


def test_greedy_against_exhaustive_exact_obs():
    b = 6
    for seed in range(3):
        w, fisher, finv = _problem(b, seed=seed)
        res = greedy_obs(w, finv)
        order, trace = res.order[0], res.trace[0]
        assert sorted(order.tolist()) == list(range(b))
        assert torch.all(trace[1:] >= trace[:-1])
        for k in range(1, b + 1):
            chosen = torch.zeros(b, dtype=torch.bool)
            chosen[order[:k]] = True
            exact = exact_removal_loss(w[0], fisher[0], chosen)
            torch.testing.assert_close(trace[k - 1], exact, rtol=1e-9, atol=1e-12)  # trace = exact quadratic loss
            best = min(
                exact_removal_loss(w[0], fisher[0], torch.isin(torch.arange(b), torch.tensor(s)))
                for s in itertools.combinations(range(b), k)
            )
            assert best <= trace[k - 1] + 1e-12
            if k == 1:
                torch.testing.assert_close(trace[0], best)
            # sequential removals with downdates == joint group OBS on the same set
            joint_w, joint_loss = group_obs_update(w, finv, chosen[None])
            torch.testing.assert_close(joint_loss[0], trace[k - 1], rtol=1e-9, atol=1e-12)
            seq_w, seq_f = w[0].clone(), finv[0].clone()
            for q in order[:k].tolist():
                seq_w, seq_f = obs_update(seq_w, seq_f, q), obs_downdate(seq_f, q)
            torch.testing.assert_close(joint_w[0], seq_w, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res.weights, torch.zeros_like(w), atol=1e-12, rtol=0)


def test_replay_of_prefixes_equals_group_obs():
    w, _, finv = _problem(12, n=4, seed=11)
    res = greedy_obs(w, finv, factors=True, compact_every=5)
    torch.testing.assert_close(res.factors.transpose(1, 2) @ res.factors, finv, rtol=1e-8, atol=1e-10)
    for counts in (torch.tensor([0, 3, 7, 12]), torch.tensor([12, 1, 5, 0])):
        remove = prefix_mask(res.order, counts, 12)
        ref, _ = group_obs_update(w, finv, remove)
        torch.testing.assert_close(
            replay_prefix(w, res.order, res.factors, res.alphas, counts), ref, rtol=1e-8, atol=1e-10
        )


def test_greedy_is_batched_per_block():
    w, _, finv = _problem(8, n=4, seed=5)
    batched = greedy_obs(w, finv)
    for i in range(4):
        one = greedy_obs(w[i : i + 1], finv[i : i + 1])
        assert torch.equal(one.order[0], batched.order[i])
        torch.testing.assert_close(one.trace[0], batched.trace[i])


def test_compaction_does_not_change_the_result():
    w, _, finv = _problem(24, n=3, seed=4)
    pruned = torch.zeros(3, 24, dtype=torch.bool)
    pruned[:, ::5] = True
    w = torch.where(pruned, torch.zeros_like(w), w)
    for kwargs in ({}, {"nm": (2, 4)}, {"pruned": pruned}):
        a = greedy_obs(w, finv, compact_every=1, **kwargs)
        b = greedy_obs(w, finv, compact_every=1000, **kwargs)
        assert torch.equal(a.order, b.order)
        torch.testing.assert_close(a.trace, b.trace, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-9, atol=1e-12)


def test_greedy_float32_matches_float64():
    w, _, finv = _problem(16, n=3, seed=6)
    a = greedy_obs(w.float(), finv.float(), dtype=torch.float32)
    b = greedy_obs(w, finv)
    torch.testing.assert_close(a.trace.double(), b.trace, rtol=1e-3, atol=1e-6)


def test_group_update_is_constrained_optimum():
    w, fisher, finv = _problem(7, n=2, seed=7)
    remove = torch.tensor([[1, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    new, loss = group_obs_update(w, finv, remove)
    assert torch.all(new[remove] == 0)
    torch.testing.assert_close(new[1], w[1])  # nothing removed: unchanged
    torch.testing.assert_close(loss[0], exact_removal_loss(w[0], fisher[0], remove[0]))
    dw = new[0] - w[0]
    torch.testing.assert_close(0.5 * dw @ fisher[0] @ dw, loss[0])


def test_already_pruned_go_first_at_no_cost():
    w, _, finv = _problem(6, seed=8)
    pruned = torch.tensor([[False, True, False, False, True, False]])
    w = torch.where(pruned, torch.zeros_like(w), w)
    res = greedy_obs(w, finv, pruned=pruned)
    assert set(res.order[0, :2].tolist()) == {1, 4}
    assert torch.all(res.trace[0, :2] == 0)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4)])
def test_nm_greedy_against_exhaustive(nm):
    keep, group = nm
    b = 8
    w, fisher, finv = _problem(b, seed=9)
    res = greedy_obs(w, finv, nm=nm)
    removed = torch.zeros(b, dtype=torch.bool)
    removed[res.order[0]] = True
    assert res.order.shape[1] == b * (group - keep) // group
    assert all(int(removed[i : i + group].sum()) == group - keep for i in range(0, b, group))
    loss = exact_removal_loss(w[0], fisher[0], removed)
    torch.testing.assert_close(res.trace[0, -1], loss, rtol=1e-9, atol=1e-12)
    per_group = [list(itertools.combinations(range(i, i + group), group - keep)) for i in range(0, b, group)]
    best = min(
        exact_removal_loss(w[0], fisher[0], torch.isin(torch.arange(b), torch.tensor(sum(c, ()))))
        for c in itertools.product(*per_group)
    )
    assert best <= loss + 1e-12
    new, _ = group_obs_update(w, finv, removed[None])
    torch.testing.assert_close(res.weights, new, rtol=1e-9, atol=1e-12)


def test_global_allocation_takes_smallest_trace_values():
    torch.manual_seed(0)
    traces = [torch.rand(3, 5).cumsum(1), torch.rand(2, 3).cumsum(1) * 2]
    targets = [0.0, 0.3, 0.5, 1.0]
    counts = allocate_counts(traces, targets)
    flat = torch.cat([t.flatten() for t in traces])
    for t, target in enumerate(targets):
        k = round(target * flat.numel())
        thresh = flat.sort().values[k - 1] if k else -1.0
        for tr, c in zip(traces, counts[t], strict=True):
            assert torch.equal(c, (tr <= thresh).sum(1))  # prefix of each block below the global threshold
        assert sum(int(c.sum()) for c in counts[t]) == k


def test_per_layer_allocation_groups():
    traces = [torch.arange(8.0).reshape(2, 4), torch.arange(8.0).reshape(2, 4) + 100]
    glob = allocate_counts(traces, [0.5])[0]
    assert [c.tolist() for c in glob] == [[4, 4], [0, 0]]
    per_layer = allocate_counts(traces, [0.5], groups=[0, 1])[0]
    assert [c.tolist() for c in per_layer] == [[4, 0], [4, 0]]


def test_prefix_mask():
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    mask = prefix_mask(order, torch.tensor([2, 0]), 3)
    assert mask.tolist() == [[True, False, True], [False, False, False]]


def test_tiny_absolute_damping_raises_clear_error_instead_of_crashing():
    """Regression: an absolute damp of 1e-8 on O(1) gradients made the float32 Fisher indefinite (the inverse has
    negative diagonal entries); the greedy then picked a removed weight twice and crashed in its compaction with
    ``shape '[64, 32]' is invalid``. It must raise a VitPruneError naming the dampening instead."""
    from vitprune.errors import VitPruneError
    from vitprune.scoring.fisher import FisherInverses

    g = torch.Generator().manual_seed(0)
    numels = {"qkv": 64 * 48, "proj": 16 * 48, "fc1": 32 * 48}
    grads = {k: torch.randn(16, n, generator=g) for k, n in numels.items()}
    weights = {k: torch.randn(n, generator=g).view(-1, 48) for k, n in numels.items()}
    tiny = FisherInverses.create(numels, 48, 16, 1e-8)
    sane = FisherInverses.create(numels, 48, 16, 0.3, relative=True)
    for est in (tiny, sane):
        est.add(grads)
        est.finalize()
    with pytest.raises(VitPruneError, match="damp"):
        for name, w in weights.items():
            greedy_obs(w, tiny[name].blocks[0], dtype=torch.float32, factors=True)
    for name, w in weights.items():  # the same gradients with a sane dampening work
        res = greedy_obs(w, sane[name].blocks[0], dtype=torch.float32, factors=True)
        assert torch.equal(res.order.sort(dim=1).values, torch.arange(48).expand(w.shape[0], 48))
        assert torch.isfinite(res.trace).all() and torch.isfinite(res.weights).all()


def test_indefinite_inverse_with_positive_diagonal_warns_not_crashes():
    """Indefiniteness that only shows in the downdated pivots is reported too (never a duplicate removal)."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(4, 24, 24, generator=g, dtype=torch.float64))
    eigs = torch.ones(4, 24, dtype=torch.float64)
    eigs[:, :3] = -0.05
    finv = q @ torch.diag_embed(eigs) @ q.transpose(1, 2)
    assert bool((finv.diagonal(dim1=1, dim2=2) > 0).all())
    w = torch.randn(4, 24, generator=g, dtype=torch.float64)
    for compact_every in (1, 4, 1000):
        with pytest.warns(RuntimeWarning, match="damp"):
            res = greedy_obs(w, finv, compact_every=compact_every, factors=True)
        for row in res.order:  # every weight removed exactly once
            assert sorted(row.tolist()) == list(range(24))
