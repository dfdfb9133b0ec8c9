"""Unstructured pruning baselines: global / uniform magnitude, Wanda and SparseGPT (METHODS.md section 4).

Each is one small :class:`~vitprune.pruners.base.UnstructuredPruner` (registered as ``gm``, ``um``, ``wanda``,
``sparsegpt``) over :func:`prune_baseline`, interchangeable with :class:`vitprune.pruners.obs.OBSPruner`: the
same :class:`~vitprune.pruners.base.PruneResult` (a pruned copy and boolean keep-masks keyed by parameter name,
the type :class:`vitprune.training.masks.WeightMasks` takes).

- ``gm``: one magnitude threshold over all prunable weights; ``um``: the same fraction in every layer.
- ``wanda`` (Sun et al. 2023, eq. 1): score ``|W_ij| * ||X_j||_2``; each output row loses its lowest-scored
  fraction; no weight update.
- ``sparsegpt`` (Frantar & Alistarh 2023, Algorithm 1): ``H = X^T X + damp * mean(diag) * I``; columns are
  swept left to right in blocks; within a block the mask is chosen by ``w^2 / [U]_jj^2`` (``U`` the upper
  Cholesky factor of ``H^-1``), each pruned weight's error ``(w - 0) / U_jj`` is fed back to the later columns
  via row ``j`` of ``U`` (the OBS update with the downdated inverse), and the block's accumulated error is
  propagated to the remaining columns at once.

Wanda and SparseGPT calibrate block by block: each block sees inputs produced by the already-pruned blocks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.pruners.base import Run
from vitprune.pruners.calibration import (
    DEFAULT_PATTERNS,
    InputStats,
    SparsePruneResult,
    capture_block_inputs,
    clone_model,
    find_linears,
    input_stats_hook,
    sequential_block_stats,
    sparsity_report,
    take_batches,
)
from vitprune.pruners.settings import setting
from vitprune.pruners.unstructured import UnstructuredConfig, UnstructuredPruner

BASELINES = ("gm", "um", "wanda", "sparsegpt")


def _check_sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise VitPruneError(f"sparsity must be in [0, 1), got {s}")
    return s


def lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Bool keep-mask of ``scores`` with the ``k`` lowest entries (ties broken by position) set to False."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return keep.view(scores.shape)


def row_lowest_mask(scores: Tensor, k: int) -> Tensor:
    """Keep-mask with the ``k`` lowest entries of every row of ``scores`` pruned."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
    return keep


def nm_mask(scores: Tensor, nm: tuple[int, int]) -> Tensor:
    """Keep the ``N`` highest-scored of every ``M`` consecutive entries along the input dimension (dim 1)."""
    n, m = nm
    rows, cols = scores.shape
    if cols % m:
        raise VitPruneError(f"N:M {n}:{m} needs the input width to be a multiple of {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2, largest=True, sorted=False).indices, True)
    return keep.reshape(rows, cols)


def magnitude_masks(
    weights: dict[str, Tensor], sparsity: float, scope: str = "global", nm: tuple[int, int] | None = None
) -> dict[str, Tensor]:
    """Keep-masks by ``|w|``: one global threshold (``scope='global'``) or per layer (``'layer'``), or N:M."""
    if nm is not None:
        return {n: nm_mask(w.abs(), nm) for n, w in weights.items()}
    sparsity = _check_sparsity(sparsity)
    if scope == "layer":
        return {n: lowest_mask(w.abs(), round(sparsity * w.numel())) for n, w in weights.items()}
    if scope != "global":
        raise VitPruneError(f"unknown magnitude scope {scope!r}")
    flat = torch.cat([w.abs().flatten().float() for w in weights.values()])
    keep = lowest_mask(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def wanda_mask(weight: Tensor, sqnorm: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Wanda keep-mask: score ``|W_ij| * ||X_j||_2`` compared within each output row (or N:M group)."""
    score = weight.abs().double() * sqnorm.double().sqrt()[None, :]
    if nm is not None:
        return nm_mask(score, nm)
    return row_lowest_mask(score, round(_check_sparsity(sparsity) * weight.shape[1]))


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    gram: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT (Algorithm 1) on one layer; returns ``(new weight, keep-mask)``. ``gram = X^T X`` (any scale)."""
    w = weight.detach().double().clone()
    h = gram.detach().double().clone()
    _rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise VitPruneError("SparseGPT: the input Hessian is not positive definite (raise --damp)") from None
    if nm is None:
        sparsity = _check_sparsity(sparsity)
    else:
        if cols % nm[1]:
            raise VitPruneError(f"N:M {nm[0]}:{nm[1]} needs the input width to be a multiple of {nm[1]}, got {cols}")
        if blocksize % nm[1]:
            raise VitPruneError(f"SparseGPT block size {blocksize} must be a multiple of M={nm[1]}")
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = u1.diagonal()
        if nm is None:
            keep1 = lowest_mask(w1.pow(2) / d.pow(2)[None, :], round(sparsity * w1.numel()))
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                score = w1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2)[None, :]
                keep1[:, i : i + nm[1]] = nm_mask(score, nm)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        keep[:, i1:i2] = keep1
    return w.to(weight.dtype), keep


@torch.no_grad()
def collect_input_stats(
    model: nn.Module, loader: Iterable, names: Sequence[str], num_samples: int, device: str | torch.device = "cpu"
) -> dict[str, InputStats]:
    """Input statistics of the named linears from full-model forwards (non-sequential)."""
    modules = dict(model.named_modules())
    stats = {n: InputStats() for n in names}
    handles = [modules[n].register_forward_hook(input_stats_hook(stats[n], True)) for n in names]
    try:
        for images, _ in take_batches(loader, num_samples, device):
            model(images)
    finally:
        for h in handles:
            h.remove()
    return stats


def prune_baseline(
    model: nn.Module,
    method: str,
    sparsities: Sequence[float],
    loader: Iterable | None = None,
    patterns: Iterable[str] = DEFAULT_PATTERNS,
    nm: tuple[int, int] | None = None,
    num_samples: int = 128,
    blocksize: int = 128,
    damp: float = 0.01,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[float, SparsePruneResult]:
    """Prune copies of ``model`` with a baseline ``method`` (one of :data:`BASELINES`) at every sparsity.

    With ``nm`` the sparsity is fixed at ``(M - N) / M`` (``sparsities`` is ignored). Wanda and SparseGPT need a
    calibration ``loader`` (``num_samples`` images, block-sequential, re-run per target since pruned blocks
    change later inputs).
    """
    if method not in BASELINES:
        raise VitPruneError(f"unknown pruning method {method!r} (choose from {', '.join(BASELINES)})")
    targets = [(nm[1] - nm[0]) / nm[1]] if nm is not None else [_check_sparsity(s) for s in sparsities]
    names = list(find_linears(model, patterns))
    tokens = mask = None
    capture_s = 0.0
    if method in ("wanda", "sparsegpt"):
        if loader is None:
            raise VitPruneError(f"{method} needs calibration data")
        t0 = time.perf_counter()
        tokens, mask = capture_block_inputs(model, loader, num_samples, device)
        capture_s = time.perf_counter() - t0
    results = {}
    for target in targets:
        t0 = time.perf_counter()
        pruned = clone_model(model).eval()
        linears = find_linears(pruned, names)
        masks: dict[str, Tensor] = {}
        if method in ("gm", "um"):
            keep = magnitude_masks(
                {n: m.weight.detach() for n, m in linears.items()}, target, "global" if method == "gm" else "layer", nm
            )
            for n, m in linears.items():
                m.weight.data.mul_(keep[n])
                masks[f"{n}.weight"] = keep[n]
        else:

            def prune_layers(layer_stats: dict[str, tuple[nn.Linear, InputStats]], target=target, masks=masks):
                for n, (lin, st) in layer_stats.items():
                    if method == "wanda":
                        keep = wanda_mask(lin.weight, st.sqnorm, target, nm)
                        lin.weight.data.mul_(keep)
                    else:
                        new, keep = sparsegpt_prune(lin.weight, st.gram, target, nm, blocksize, damp)
                        lin.weight.data.copy_(new)
                    masks[f"{n}.weight"] = keep

            in_blocks = [n for n in names if n.startswith("blocks.")]
            sequential_block_stats(
                pruned, tokens, mask, in_blocks, prune_layers, gram=method == "sparsegpt", batch_size=batch_size
            )
            rest = [n for n in names if n not in in_blocks]
            if rest:
                stats = collect_input_stats(pruned, loader, rest, num_samples, device)
                prune_layers({n: (linears[n], stats[n]) for n in rest})
        report = {"method": method, "target": target, "nm": f"{nm[0]}:{nm[1]}" if nm else None}
        report.update(sparsity_report(masks))
        report["time_s"] = time.perf_counter() - t0 + capture_s
        results[target] = SparsePruneResult(pruned, masks, report)
    return results


# ------------------------------------------------------------------------------------------------ pruners
@dataclass
class BaselineConfig(UnstructuredConfig):
    """Settings of the unstructured baselines (calibration size and SparseGPT's solver)."""

    num_samples: int = setting(128, low=1, help="calibration images (wanda, sparsegpt)")
    damp: float = setting(0.01, low=0.0, low_open=True, help="sparsegpt: dampening x mean diag(X^T X)")
    blocksize: int = setting(128, low=1, help="sparsegpt: column block size")


class _Baseline(UnstructuredPruner):
    Config: ClassVar[type[BaselineConfig]] = BaselineConfig
    needs_data: ClassVar[bool] = False

    def calibration_images(self) -> int | None:
        return self.config.num_samples if self.needs_data else 0

    def sparsify(self, model: nn.Module, run: Run) -> dict[float, SparsePruneResult]:
        cfg = self.config
        return prune_baseline(
            model, self.name, cfg.targets, run.data.calib if self.needs_data else None, cfg.patterns, cfg.nm_pair,
            cfg.num_samples, cfg.blocksize, cfg.damp, run.device,
        )  # fmt: skip


class GlobalMagnitudePruner(_Baseline):
    """Unstructured baseline: one global |w| threshold."""


class UniformMagnitudePruner(_Baseline):
    """Unstructured baseline: |w| with the same sparsity in every layer."""


class WandaPruner(_Baseline):
    """Unstructured baseline: Wanda, |W| * ||X|| per output row."""

    needs_data = True


class SparseGPTPruner(_Baseline):
    """Unstructured baseline: SparseGPT, layer-wise OBS reconstruction."""

    needs_data = True
