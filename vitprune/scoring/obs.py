"""Optimal Brain Surgeon on block-diagonal Fisher inverses: saliency, updates, correlated removal, N:M.

All functions work on a *batch of blocks*: weights ``w`` of shape ``(n, b)`` and inverses ``finv`` of shape
``(n, b, b)`` (one ``F^-1`` block per row of ``w``; see :mod:`vitprune.scoring.fisher`).

Formulas (Hassibi & Stork 1993, "Optimal Brain Surgeon", eqs. 4-5; oViT/CAP section 3; METHODS.md section 4):

- saliency of removing weight ``q``: ``rho_q = w_q^2 / (2 [F^-1]_qq)``;
- optimal compensation of the others: ``dw = -(w_q / [F^-1]_qq) F^-1[:, q]``;
- after removing ``q`` the inverse of the Fisher restricted to the remaining weights is the downdate
  ``F^-1 <- F^-1 - F^-1[:, q] F^-1[q, :] / [F^-1]_qq`` (a Schur complement; row and column ``q`` become 0);
- removing a set ``Q`` jointly (group OBS): ``dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q`` with loss
  ``1/2 w_Q^T (F^-1[Q, Q])^-1 w_Q``. Removing the elements of ``Q`` one at a time with downdates gives exactly the
  same weights and the same total loss, so a greedy removal *order* plus its cumulative loss *trace* describes the
  OBS solution for every prefix of the order. :func:`greedy_obs` computes them (oViT's correlation-aware
  pruner); :func:`group_obs_update` applies the joint update for any chosen prefix without recomputation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.errors import VitPruneError


def obs_saliency(w: Tensor, finv_diag: Tensor) -> Tensor:
    """``rho_q = w_q^2 / (2 [F^-1]_qq)`` (OBS eq. 5)."""
    return w.pow(2) / (2.0 * finv_diag)


def obs_update(w: Tensor, finv: Tensor, q: int) -> Tensor:
    """Weights after removing ``q`` with the OBS compensation ``dw = -(w_q / [F^-1]_qq) F^-1[:, q]`` (OBS eq. 4)."""
    out = w - (w[q] / finv[q, q]) * finv[:, q]
    out[q] = 0.0
    return out


def obs_downdate(finv: Tensor, q: int) -> Tensor:
    """``F^-1 - F^-1[:, q] F^-1[q, :] / [F^-1]_qq``: the inverse Fisher of the weights left after removing ``q``."""
    return finv - torch.outer(finv[:, q], finv[q, :]) / finv[q, q]


@dataclass
class GreedyTrace:
    """Result of :func:`greedy_obs` for a batch of ``n`` blocks of size ``b``.

    ``order[i, k]`` is the k-th weight removed from block i; ``trace[i, k]`` the cumulative OBS loss after
    removing ``order[i, :k+1]`` (non-decreasing in k); ``weights`` the block weights after the last removal.
    With ``factors=True``: ``factors[i, k] = F_k^-1[:, q_k] / sqrt([F_k^-1]_qq)`` (the k-th downdate column in
    original coordinates, ``F_k^-1`` the inverse downdated k times) and ``alphas[i, k] = w_q / sqrt([F_k^-1]_qq)``
    (with the compensated ``w`` of step k), so that the weights after any prefix of ``k`` removals are
    ``w - sum_{j<k} alphas[j] * factors[j]`` (:func:`replay_prefix`); and ``F^-1 = factors^T factors``.
    """

    order: Tensor
    trace: Tensor
    weights: Tensor
    factors: Tensor | None = None
    alphas: Tensor | None = None


@torch.no_grad()
def greedy_obs(
    w: Tensor,
    finv: Tensor,
    steps: int | None = None,
    pruned: Tensor | None = None,
    nm: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float64,
    compact_every: int = 16,
    factors: bool = False,
) -> GreedyTrace:
    """Correlation-aware greedy removal, one weight at a time per block, batched over blocks (oViT section 3).

    At every step each block removes its weight of smallest ``rho`` (computed with the current, already
    compensated weights and the downdated ``F^-1``), applies ``dw`` and downdates ``F^-1`` (one batched rank-1
    ``baddbmm``). Every ``compact_every`` steps the removed rows/columns (exact zeros after the downdate) are
    dropped from the working copy, so the work falls from ``b^3`` to about ``b^3 / 3`` per block.
    ``pruned`` (bool, like ``w``) marks weights that are already zero and must go first at no cost (gradual
    pruning). ``nm=(N, M)``: keep N of every M consecutive weights, i.e. remove ``M - N`` per group of M (block
    size a multiple of M); ``steps`` then defaults to ``b * (M - N) / M``.
    ``finv`` is not modified (a working copy in ``dtype`` is downdated). ``factors=True`` also records what
    :func:`replay_prefix` needs to rebuild the weights after any prefix of the order (see :class:`GreedyTrace`).

    ``finv`` must be positive definite: every diagonal entry, and every pivot ``[F_k^-1]_qq`` met on the way,
    is positive in exact arithmetic. A non-positive or non-finite diagonal entry means the dampening ``lambda``
    is too small for the precision of the Fisher estimate (e.g. an absolute ``1e-8`` on large gradients): that
    raises :class:`~vitprune.errors.VitPruneError` naming the dampening. Non-positive pivots met later (round-off
    deep into a block) give a ``RuntimeWarning``; the removal order stays valid (no weight is picked twice).
    """
    n, b = w.shape
    dev = w.device
    diag = finv.diagonal(dim1=-2, dim2=-1)
    bad = ~(torch.isfinite(diag) & (diag > 0))
    if bool(bad.any()):
        _raise_indefinite(f"{int(bad.sum())} of {diag.numel()} diagonal entries of F^-1 are <= 0 or not finite")
    f = finv.to(dtype=dtype, copy=True)
    cur = w.to(dtype=dtype, copy=True)
    idx = torch.arange(b, device=dev).expand(n, b).clone()  # original position of each working column
    removed = torch.zeros(n, b, dtype=torch.bool, device=dev)
    if nm is not None:
        keep, group = nm
        if b % group:
            raise ValueError(f"block size {b} is not a multiple of M={group}")
        per_group = group - keep
        steps = b * per_group // group if steps is None else steps
        group_removed = torch.zeros(n, b // group, dtype=torch.long, device=dev)
    steps = b if steps is None else min(steps, b)
    prio = pruned.clone() if pruned is not None else None
    order = torch.empty(n, steps, dtype=torch.long, device=dev)
    trace = torch.empty(n, steps, dtype=dtype, device=dev)
    rows = torch.arange(n, device=dev)
    total = torch.zeros(n, dtype=dtype, device=dev)
    tiny = torch.finfo(dtype).tiny
    huge = torch.finfo(dtype).max
    bad_pivots = torch.zeros((), dtype=torch.long, device=dev)
    since = 0
    fac = torch.zeros(n, steps, b, dtype=dtype, device=dev) if factors else None
    alphas = torch.zeros(n, steps, dtype=dtype, device=dev) if factors else None
    for step in range(steps):
        if since >= compact_every:
            r = cur.shape[1] - since
            keep_local = (~removed).nonzero()[:, 1].view(n, r)
            idx, cur = idx.gather(1, keep_local), cur.gather(1, keep_local)
            prio = prio.gather(1, keep_local) if prio is not None else None
            f = f.gather(1, keep_local[:, :, None].expand(n, r, f.shape[2]))
            f = f.gather(2, keep_local[:, None, :].expand(n, r, r))
            removed = torch.zeros(n, r, dtype=torch.bool, device=dev)
            since = 0
        rho = cur.pow(2) / (2.0 * f.diagonal(dim1=1, dim2=2).clamp_min(tiny))
        # overflowing / NaN saliencies stay finite so that argmin can never fall on a removed weight (inf)
        rho = torch.nan_to_num(rho, nan=huge, posinf=huge)
        rho.masked_fill_(removed, float("inf"))
        if prio is not None:
            rho.masked_fill_(prio & ~removed, -1.0)
        if nm is not None:
            full = group_removed.gather(1, idx // group) >= per_group
            rho.masked_fill_(full & ~removed, float("inf"))
        q = rho.argmin(dim=1)
        cost = rho[rows, q].clamp_min(0.0)
        col = f[rows, :, q]  # (n, r) = F^-1[:, q] (symmetric)
        d = col[rows, q]
        bad_pivots += (~(torch.isfinite(d) & (d > 0))).sum()
        safe = torch.where(d > 0, d, torch.ones_like(d))
        coef = torch.where(d > 0, cur[rows, q] / safe, torch.zeros_like(d))
        if fac is not None:
            root = safe.sqrt()
            fac[:, step, :].scatter_(1, idx, torch.where(d[:, None] > 0, col / root[:, None], 0.0))
            alphas[:, step] = torch.where(d > 0, cur[rows, q] / root, 0.0)
        cur.sub_(coef[:, None] * col)
        cur[rows, q] = 0.0
        f.baddbmm_(col[:, :, None], torch.where(d[:, None] > 0, col / safe[:, None], 0.0)[:, None, :], alpha=-1.0)
        f[rows, q, :] = 0.0
        f[rows, :, q] = 0.0
        removed[rows, q] = True
        since += 1
        orig = idx[rows, q]
        if nm is not None:
            group_removed[rows, orig // group] += 1
        total += cost
        order[:, step] = orig
        trace[:, step] = total
    if int(bad_pivots):  # round-off late in a long removal can do this: warn, the order stays valid
        warnings.warn(
            f"OBS greedy removal: {int(bad_pivots)} of {n * steps} pivots [F^-1]_qq were <= 0 or not finite (those"
            " removals got no compensating update); the Fisher inverse is numerically indefinite: a larger damp"
            " helps",
            RuntimeWarning,
            stacklevel=2,
        )
    weights = torch.zeros(n, b, dtype=dtype, device=dev).scatter_(1, idx, cur)
    return GreedyTrace(order=order, trace=trace, weights=weights.to(w.dtype), factors=fac, alphas=alphas)


def _raise_indefinite(what: str) -> None:
    raise VitPruneError(
        f"OBS greedy removal: the Fisher inverse is not positive definite ({what}). The dampening lambda is too "
        "small for the precision of the Fisher estimate (e.g. an absolute damp such as 1e-8); use a larger "
        "--damp or the default relative dampening (damp_relative=True, no --damp-absolute)"
    )


@torch.no_grad()
def replay_prefix(w: Tensor, order: Tensor, factors: Tensor, alphas: Tensor, counts: Tensor) -> Tensor:
    """Weights of each block after removing the first ``counts[i]`` weights of ``order[i]`` with OBS updates.

    ``w - sum_{j < counts} alphas[j] * factors[j]`` (one batched ``bmm``; equal to :func:`group_obs_update` on
    the same set, since sequential OBS removals with downdates are the joint group-OBS solution), then exactly 0
    on the removed weights. This is how one greedy pass serves every sparsity target without any solve.
    """
    steps = order.shape[1]
    take = torch.arange(steps, device=w.device)[None, :] < counts[:, None]
    coef = torch.where(take, alphas, torch.zeros_like(alphas)).to(factors.dtype)
    new = w.to(factors.dtype) - torch.bmm(coef[:, None, :], factors)[:, 0, :]
    new = torch.where(prefix_mask(order, counts, w.shape[1]), torch.zeros_like(new), new)
    return new.to(w.dtype)


def prefix_mask(order: Tensor, counts: Tensor, size: int) -> Tensor:
    """Bool ``(n, size)``: True for the first ``counts[i]`` entries of ``order[i]`` (the weights to remove)."""
    n, steps = order.shape
    take = torch.arange(steps, device=order.device)[None, :] < counts[:, None]
    mask = torch.zeros(n, size, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order, take)
    return mask


@torch.no_grad()
def group_obs_update(
    w: Tensor, finv: Tensor, remove: Tensor, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Joint OBS removal of the set ``remove`` (bool ``(n, b)``) in every block (group OBS, oViT section 3).

    Returns the new weights ``w - F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q`` (exactly 0 on Q) and the per-block loss
    ``1/2 w_Q^T (F^-1[Q, Q])^-1 w_Q``. Batched: the system ``F^-1[Q, Q]`` is padded with the identity outside Q,
    so blocks with different sets share one batched Cholesky solve.
    """
    f = finv.to(dtype)
    wd = w.to(dtype)
    pair = remove[:, :, None] & remove[:, None, :]
    eye = torch.eye(w.shape[1], dtype=dtype, device=w.device).expand_as(f)
    system = torch.where(pair, f, eye)
    rhs = torch.where(remove, wd, torch.zeros_like(wd))[:, :, None]
    chol, info = torch.linalg.cholesky_ex(system)
    z = torch.linalg.lstsq(system, rhs).solution if bool((info != 0).any()) else torch.cholesky_solve(rhs, chol)
    new = wd - torch.bmm(f, z)[:, :, 0]
    new = torch.where(remove, torch.zeros_like(new), new)
    loss = 0.5 * (rhs * z).sum(dim=(1, 2))
    return new.to(w.dtype), loss


def exact_removal_loss(w: Tensor, fisher: Tensor, remove: Tensor) -> Tensor:
    """Reference from ``F`` itself: ``min 1/2 dw^T F dw`` subject to ``(w + dw)_Q = 0`` (one block, float64)."""
    q = remove.nonzero().flatten()
    r = (~remove).nonzero().flatten()
    dq = -w[q].double()
    f = fisher.double()
    dr = -torch.linalg.solve(f[r][:, r], f[r][:, q] @ dq) if r.numel() else dq.new_zeros(0)
    dw = torch.zeros_like(w, dtype=torch.float64)
    dw[q], dw[r] = dq, dr
    return 0.5 * dw @ f @ dw


@torch.no_grad()
def allocate_counts(traces: list[Tensor], targets: list[float], groups: list[int] | None = None) -> list[list[Tensor]]:
    """How many weights each block loses for each target sparsity: one threshold on the cumulative OBS losses.

    ``traces``: list of ``(n_i, b_i)`` full traces (non-decreasing along dim 1). Within each allocation group
    (``groups[i]``; default: one global group over all blocks of all layers, oViT section 3) the
    ``round(target * size)`` smallest trace values are taken; since every trace is non-decreasing they are a
    prefix of each block's removal order, so the count per block defines the pruned set. A stable sort over all
    values is done once and reused for every target (the one-pass sweep). Returns ``counts[target][i]``, a
    long tensor ``(n_i,)``.
    """
    groups = groups if groups is not None else [0] * len(traces)
    out: list[list[Tensor | None]] = [[None] * len(traces) for _ in targets]
    for g in sorted(set(groups)):
        members = [i for i, gi in enumerate(groups) if gi == g]
        values = torch.cat([traces[i].double().flatten() for i in members])
        block_ids = torch.cat(
            [
                torch.arange(traces[i].shape[0], device=values.device).repeat_interleave(traces[i].shape[1]) + off
                for i, off in zip(members, _offsets([traces[i].shape[0] for i in members]), strict=True)
            ]
        )
        nblocks = sum(traces[i].shape[0] for i in members)
        idx = torch.sort(values, stable=True).indices
        for t, target in enumerate(targets):
            k = round(float(target) * values.numel())
            counts = torch.bincount(block_ids[idx[:k]], minlength=nblocks)
            for i, off in zip(members, _offsets([traces[j].shape[0] for j in members]), strict=True):
                out[t][i] = counts[off : off + traces[i].shape[0]]
    return out  # type: ignore[return-value]


def _offsets(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out
