"""Closed-form layer-wise reconstruction after pruning (METHODS.md section 8; issue #14).

After a structural selection (NViT, VTP, any masks) or an unstructured one (OBS, GM, Wanda), the weights of the
linears that lost inputs are re-solved by least squares so that the pruned layer reproduces a dense target on
calibration activations. Every solve works on sufficient statistics accumulated over calibration tokens — the
input Gram ``H = X^T X`` and the cross term ``C = T^T X`` (``X`` the layer inputs with an appended ones column,
so the bias is refitted, ``T`` the target outputs) — never on stored activations, so memory is ``O(width^2)``
per layer; under torchrun ``H``, ``C``, ``||T||^2`` and the token count are all-reduced before the solve.

Formulas (``lam = damping * mean(diag H)`` is added to the diagonal of every system; Frantar & Alistarh,
"SparseGPT", 2023, eq. 1 and the dampening of Sec. 3; Kurtic et al., "ZipLM", 2023, eqs. 2-4; Hassibi & Stork,
"Optimal Brain Surgeon", 1993, eqs. 4-5):

- :func:`solve_lstsq`: ``W' = C (H + lam I)^-1`` — the normal equations of ``min ||T - X W^T||^2`` (ridge);
- :func:`compensate_columns`: with dense inputs and the dense layer as target (``C = W H``), keeping columns K and
  removing S: ``W_K' = W_K + W_S H_SK H_KK^-1``, identical to the group-OBS update with the layer Hessian
  ``dW = -W_S ([H^-1]_SS)^-1 [H^-1]_S,:`` (:func:`group_obs_update`; ZipLM eq. 3);
- :func:`group_obs_cost`: the output error of removing S with that optimal compensation,
  ``tr(W_S ([H^-1]_SS)^-1 W_S^T)`` (ZipLM eq. 4; OBS eq. 5 for ``|S| = 1``: ``||W_:,s||^2 / [H^-1]_ss``);
- :func:`solve_masked_rows`: a fixed unstructured mask, each output row solved on its kept inputs,
  ``w_r,K = C_r,K (H_KK + lam I)^-1`` — SparseGPT's layer-wise objective (eq. 1) with the mask given, solved
  exactly per row (batched Cholesky over rows) instead of SparseGPT's one-sided column sweep.

What :func:`reconstruct_structural` compensates, and why:

- **MLP neurons** (``fc2`` columns) and **V dims / heads** (``proj`` columns): ``fc2`` and ``proj`` are linear in
  their inputs, so the kept columns and the bias are re-solved exactly (the layer's output rows are the kept
  embedding channels only);
- **removed embedding channels**: their output rows are gone, so only the kept channels are compared; their loss
  on the inputs of ``qkv`` / ``fc1`` changes the LayerNorm statistics, which is not a column subset of the dense
  inputs. In sequential mode the student's own (renormalised) inputs are used, and ``refit_inputs=True`` also
  re-solves the kept rows of ``qkv`` and ``fc1`` to reproduce the dense pre-activations (each linear in its input);
- **QK dims**: not compensated. They act through ``softmax(q k^T)``, bilinear then nonlinear: the kept dims can be
  refitted to the dense q and k of the same dims (``refit_inputs``), but no linear map restores a removed dim's
  contribution to the logits;
- **removed blocks**: nothing to re-solve in the block itself; with ``target="residual"`` the next kept blocks'
  branches are fitted to the dense residual stream, so they absorb the missing block's contribution (drift);
- final norm and classifier: unchanged.

Targets (sequential mode, block ``b`` of the dense model -> block ``nb`` of the pruned one): ``"layer"`` — the
dense branch output on the dense residual stream; ``"residual"`` — the dense residual stream after the branch
minus the student's stream before it (the branch also absorbs drift carried from earlier blocks; the best in the
ViT-Tiny prototype). Non-sequential mode uses the dense model's activations only (the compensation formula).
In sequential mode the residual streams of the calibration images (dense and student, ``N x T x D`` each, as in
SparseGPT's sequential calibration) are kept on ``device``; layer inputs and outputs are not.

    small = surgery.prune_model(dense, masks)                       # masks from any structural selection
    small, report = reconstruct_structural(dense, small, masks, calib_loader, num_images=512)
    sparse, report = reconstruct_unstructured(dense, result.model, result.masks, calib_loader)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.models.vit import ViT
from vitprune.pruners.calibration import split_batch
from vitprune.structures.groups import proj_cols, qkv_rows, unit_key
from vitprune.structures.masks import StructuralMasks, architecture_after, effective_block
from vitprune.training.distributed import all_reduce_sum_

TARGETS = ("layer", "residual")
UNSTRUCTURED_TARGETS = ("layer", "residual", "self")
SCORE_KINDS = ("heads", "v", "mlp")
_F64 = torch.float64


# ============================================================================================ linear algebra
def augment(x: Tensor, bias: bool = True) -> Tensor:
    """Flatten tokens to ``(n, in)`` float64 and append a ones column when ``bias``."""
    x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(_F64)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x


def _lam(gram: Tensor, damping: float) -> float:
    """Absolute damping ``damping * mean(diag H)`` (SparseGPT Sec. 3); ``damping`` itself when H is all zero."""
    mean = float(gram.diagonal().mean()) if gram.numel() else 0.0
    return damping * mean if mean > 0 else float(damping)


def _spd_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """``system^-1 rhs`` for (batched) symmetric PSD systems: Cholesky, least squares where it fails."""
    chol, info = torch.linalg.cholesky_ex(system)
    if not bool((info != 0).any()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(system.cpu(), rhs.cpu(), driver="gelsd").solution.to(rhs)


def solve_lstsq(gram: Tensor, cross: Tensor, damping: float = 0.0) -> tuple[Tensor, float]:
    """``W' = C (H + lam I)^-1`` (normal equations of ``min ||T - X W^T||^2``; SparseGPT eq. 1, ridge-damped).

    ``gram = X^T X`` (in, in), ``cross = C = T^T X`` (out, in); returns ``(W' (out, in) float64, lam)``.
    """
    h = gram.to(_F64)
    lam = _lam(h, damping)
    system = h + lam * torch.eye(h.shape[0], dtype=_F64, device=h.device)
    return _spd_solve(system, cross.to(_F64).T).T.contiguous(), lam


def compensate_columns(weight: Tensor, gram: Tensor, keep: Tensor, damping: float = 0.0) -> tuple[Tensor, float]:
    """Kept columns that best reproduce the dense layer on dense inputs: ``W_K' = W_K + W_S H_SK H_KK^-1``.

    The least-squares solution of ``min ||X W^T - X_K W_K'^T||^2`` (METHODS.md section 8), equal to the group-OBS
    update with the layer Hessian (ZipLM eq. 3; :func:`group_obs_update`). ``weight`` (out, in) and ``gram``
    (in, in) include the ones column when the bias is refitted; ``keep`` is a bool (in,) mask. ``lam`` is
    ``damping * mean(diag H_KK)`` on ``H_KK``. Returns ``(W_K' (out, |K|), lam)``.
    """
    k = torch.nonzero(keep).flatten()
    s = torch.nonzero(~keep).flatten()
    w, h = weight.to(_F64), gram.to(_F64)
    hkk = h[k][:, k]
    lam = _lam(hkk, damping)
    hkk = hkk + lam * torch.eye(k.numel(), dtype=_F64, device=h.device)
    if s.numel() == 0:
        return w[:, k].clone(), lam
    # W_S H_SK H_KK^-1 = (H_KK^-1 H_KS W_S^T)^T
    delta = _spd_solve(hkk, h[k][:, s] @ w[:, s].T).T
    return w[:, k] + delta, lam


def _hinv(gram: Tensor, damping: float) -> tuple[Tensor, float]:
    h = gram.to(_F64)
    lam = _lam(h, damping)
    eye = torch.eye(h.shape[0], dtype=_F64, device=h.device)
    return _spd_solve(h + lam * eye, eye), lam


def group_obs_update(weight: Tensor, gram: Tensor, remove: Tensor, damping: float = 0.0) -> Tensor:
    """Group-OBS update with the layer Hessian: ``W - W_S ([H^-1]_SS)^-1 [H^-1]_S,:`` (ZipLM eq. 3; zero on S)."""
    hinv, _ = _hinv(gram, damping)
    s = torch.nonzero(remove).flatten()
    w = weight.to(_F64)
    out = w - _spd_solve(hinv[s][:, s], w[:, s].T).T @ hinv[s, :]
    out[:, s] = 0.0
    return out


def group_obs_cost(
    weight: Tensor,
    gram: Tensor,
    groups: Sequence[Tensor],
    damping: float = 0.0,
    keep: Tensor | None = None,
) -> Tensor:
    """Exact cost of removing each column group S with optimal compensation of the kept columns:
    ``tr(W_S ([H^-1]_SS)^-1 W_S^T)`` (ZipLM eq. 4; per single column ``||W_:,s||^2 / [H^-1]_ss``, OBS eq. 5).

    This is the increase of ``||X W^T - X_K W_K'^T||^2`` (``X`` the inputs whose Gram is ``gram``), each group
    removed alone from the columns ``keep`` (default: all). ``weight`` (out, in) and ``gram`` (in, in) may include
    the bias column (then never list it in a group). ``groups``: column-index tensors; columns outside ``keep``
    are ignored (a group with none kept costs 0). Groups of equal size are solved as one batch.
    """
    n = gram.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=gram.device) if keep is None else keep.to(gram.device)
    k = torch.nonzero(keep).flatten()
    local = torch.full((n,), -1, dtype=torch.long, device=gram.device)
    local[k] = torch.arange(k.numel(), device=gram.device)
    hinv, _ = _hinv(gram.to(_F64)[k][:, k], damping)
    w = weight.to(_F64)[:, k]
    out = torch.zeros(len(groups), dtype=_F64, device=gram.device)
    idx = [local[g.to(gram.device).long()] for g in groups]
    idx = [g[g >= 0] for g in idx]
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(idx):
        if g.numel():
            by_size.setdefault(g.numel(), []).append(i)
    for members in by_size.values():
        sel = torch.stack([idx[i] for i in members])  # (G, s)
        hss = hinv[sel[:, :, None], sel[:, None, :]]  # (G, s, s)
        ws = w[:, sel].permute(1, 2, 0)  # (G, s, out)
        z = _spd_solve(hss, ws)
        out[torch.tensor(members, device=gram.device)] = (ws * z).sum(dim=(1, 2))
    return out


def solve_masked_rows(
    gram: Tensor, cross: Tensor, keep: Tensor, damping: float = 0.0, max_bytes: int = 1 << 28
) -> tuple[Tensor, float]:
    """Per output row r, least squares on its kept inputs only: ``w_r,K = C_r,K (H_KK + lam I)^-1``, exactly 0
    outside K (SparseGPT eq. 1 with the mask fixed). ``keep`` (out, in) bool; ``lam`` from the full ``H``.

    Rows are solved in batches of identity-padded systems (the ``H`` entries outside ``K x K`` replaced by the
    identity, as :func:`vitprune.scoring.obs.group_obs_update` does), ``max_bytes`` per batch.
    """
    h = gram.to(_F64)
    c = cross.to(_F64)
    lam = _lam(h, damping)
    n = h.shape[0]
    eye = torch.eye(n, dtype=_F64, device=h.device)
    hd = h + lam * eye
    keep = keep.to(h.device)
    out = torch.zeros_like(c)
    step = max(1, int(max_bytes // (3 * n * n * 8)))
    for r0 in range(0, c.shape[0], step):
        kr = keep[r0 : r0 + step]
        system = torch.where(kr[:, :, None] & kr[:, None, :], hd, eye)
        rhs = torch.where(kr, c[r0 : r0 + step], torch.zeros((), dtype=_F64, device=h.device))[:, :, None]
        sol = _spd_solve(system, rhs)[:, :, 0]
        out[r0 : r0 + step] = torch.where(kr, sol, torch.zeros((), dtype=_F64, device=h.device))
    return out, lam


# ============================================================================================ statistics
@dataclass
class LstsqStats:
    """Sufficient statistics of ``min_W ||T - X W^T||^2`` over ``count`` tokens (``X`` with the ones column
    when ``bias``): ``gram = X^T X``, ``cross = T^T X`` (None for the ``"self"`` target), ``tsq = ||T||^2``."""

    gram: Tensor
    cross: Tensor | None
    tsq: Tensor
    count: int = 0
    bias: bool = True

    @classmethod
    def zeros(cls, fan_in: int, fan_out: int | None, bias: bool, device: torch.device) -> LstsqStats:
        n = fan_in + int(bias)
        cross = None if fan_out is None else torch.zeros(fan_out, n, dtype=_F64, device=device)
        return cls(
            torch.zeros(n, n, dtype=_F64, device=device), cross, torch.zeros((), dtype=_F64, device=device), 0, bias
        )

    def add(self, x: Tensor, t: Tensor | None = None) -> None:
        """Accumulate a chunk: inputs ``x`` (..., in), targets ``t`` (..., out)."""
        xa = augment(x, self.bias)
        self.gram.addmm_(xa.T, xa)
        if t is not None:
            td = t.reshape(xa.shape[0], t.shape[-1]).to(_F64)
            self.cross.addmm_(td.T, xa)
            self.tsq += td.pow(2).sum()
        self.count += xa.shape[0]

    def all_reduce_(self) -> LstsqStats:
        """Sum every statistic over torchrun ranks (identity when single-process)."""
        all_reduce_sum_(self.gram)
        if self.cross is not None:
            all_reduce_sum_(self.cross)
        all_reduce_sum_(self.tsq)
        count = torch.tensor([float(self.count)], dtype=_F64, device=self.gram.device)
        self.count = int(all_reduce_sum_(count).item())
        return self

    def error(self, weight: Tensor) -> float:
        """``||T - X W^T||^2 = ||T||^2 - 2 <W, C> + tr(W H W^T)`` from the statistics (``weight`` with bias col)."""
        w = weight.to(_F64)
        return float(self.tsq - 2.0 * (w * self.cross).sum() + ((w @ self.gram) * w).sum())

    def relative(self, weight: Tensor) -> float:
        return max(self.error(weight), 0.0) / max(float(self.tsq), 1e-300)


def _weight_aug(lin: nn.Linear, rows: Tensor | None = None) -> Tensor:
    w = lin.weight.detach().to(_F64)
    if lin.bias is not None:
        w = torch.cat([w, lin.bias.detach().to(_F64)[:, None]], dim=1)
    return w if rows is None else w[rows.to(w.device)]


@torch.no_grad()
def _write(lin: nn.Linear, w_aug: Tensor) -> None:
    n = lin.in_features
    lin.weight.copy_(w_aug[:, :n].to(lin.weight))
    if lin.bias is not None:
        lin.bias.copy_(w_aug[:, n].to(lin.bias))


# ============================================================================================ model plumbing
class _Stop(Exception):
    pass


def _device_of(model: nn.Module, device: str | torch.device | None, *others: nn.Module) -> torch.device:
    """``device`` or the model's; every model must already live there (they are not moved)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    for m in (model, *others):
        got = next(m.parameters()).device
        if got.type != dev.type or (dev.index is not None and got.index != dev.index):
            raise VitPruneError(f"reconstruction runs on {dev}, but a model is on {got}: move the models first")
    return dev


def _images(batches: Iterable, num_images: int, device: torch.device) -> Iterable[Tensor]:
    """Calibration images, at most ``num_images`` in all (per rank under torchrun)."""
    seen = 0
    for batch in batches:
        if seen >= num_images:
            break
        images, _ = split_batch(batch)
        images = images[: num_images - seen].to(device)
        seen += images.shape[0]
        yield images
    if seen == 0:
        raise VitPruneError("the calibration batches yielded no images")


@torch.no_grad()
def _block_inputs(model: ViT, images: Tensor) -> Tensor:
    """Tokens entering ``model.blocks[0]`` (or the final norm when the model has no block)."""
    target = model.blocks[0] if len(model.blocks) else model.norm
    got: list[Tensor] = []

    def pre_hook(_mod, args):
        got.append(args[0].detach())
        raise _Stop

    handle = target.register_forward_pre_hook(pre_hook)
    try:
        with contextlib.suppress(_Stop):
            model(images)
    finally:
        handle.remove()
    return got[0]


_ENDS = {"qkv": "qkv", "proj": "attn", "fc1": "fc1", "fc2": "mlp"}


@torch.no_grad()
def _run_block(block: nn.Module, x: Tensor, emb_mask: Tensor | None, stop: str | None) -> dict[str, Tensor]:
    """Run ``block`` on ``x`` up to stage ``stop`` (all when None) capturing ``<module>.in`` / ``.out`` of qkv,
    proj, fc1, fc2 and the branch outputs ``attn.branch`` / ``mlp.branch`` (gated exactly as Block.forward)."""
    cap: dict[str, Tensor] = {}
    end = _ENDS.get(stop) if stop else None
    mods = {
        "qkv": block.attn.qkv,
        "proj": block.attn.proj,
        "attn": block.attn,
        "fc1": block.mlp.fc1,
        "fc2": block.mlp.fc2,
        "mlp": block.mlp,
    }

    def make(key: str):
        def hook(_m, args, out):
            if key in ("attn", "mlp"):
                if block.branch_gate is not None:
                    out = out * block.branch_gate[0 if key == "attn" else 1]
                if emb_mask is not None:
                    out = out * emb_mask
                cap[key + ".branch"] = out
            else:
                cap[key + ".in"], cap[key + ".out"] = args[0], out
            if key == end:
                raise _Stop

        return hook

    handles = [m.register_forward_hook(make(k)) for k, m in mods.items()]
    try:
        with contextlib.suppress(_Stop):
            cap["out"] = block(x, emb_mask)
    finally:
        for h in handles:
            h.remove()
    return cap


def _chunks(x: Tensor, size: int) -> list[Tensor]:
    return list(x.split(size))


@dataclass
class _Fit:
    """One linear to re-solve in sequential mode."""

    stage: str  # qkv | proj | fc1 | fc2
    name: str  # student module name
    dense_name: str
    lin: nn.Linear  # student linear (edited in place)
    dense_lin: nn.Linear
    rows: Tensor | None  # dense output rows / channels the student's outputs correspond to (None: all)
    keep: Tensor | None = None  # unstructured keep-mask of the weight (out, in); None: solve every column


def _target(fit: _Fit, target: str, cap_d: dict, cap_s: dict, xd: Tensor, xs: Tensor) -> Tensor:
    """Target outputs of ``fit`` for one chunk (see the module docstring)."""

    def sel(t: Tensor) -> Tensor:
        return t if fit.rows is None else t.index_select(-1, fit.rows)

    if fit.stage in ("qkv", "fc1"):
        return sel(cap_d[fit.stage + ".out"])
    branch = cap_d["attn.branch" if fit.stage == "proj" else "mlp.branch"]
    if target == "layer":
        return sel(branch)
    if fit.stage == "proj":
        return sel(xd + branch) - xs
    return sel(xd + cap_d["attn.branch"] + branch) - (xs + cap_s["attn.branch"])


@torch.no_grad()
def _sequential(
    dense: ViT,
    student: nn.Module,
    pairs: list[tuple[int, int | None]],
    plans: dict[int, list[_Fit]],
    batches: Iterable,
    num_images: int,
    damping: float,
    target: str,
    device: torch.device,
    batch_size: int,
) -> list[dict[str, Any]]:
    """Block by block: accumulate each planned linear's statistics on the student's current inputs, solve, write,
    then advance both residual streams (``pairs``: dense block -> student block or None when removed)."""
    need_dense = target != "self"
    xd_all, xs_all = [], []
    for images in _images(batches, num_images, device):
        if need_dense:
            xd_all.append(_block_inputs(dense, images))
        xs_all.append(_block_inputs(student, images))
    xd_all = _chunks(torch.cat(xd_all), batch_size) if need_dense else []
    xs_all = _chunks(torch.cat(xs_all), batch_size)
    mask_d, mask_s = dense.emb_mask, student.emb_mask
    layers: list[dict[str, Any]] = []
    for b, nb in pairs:
        if nb is None:  # removed block: only the dense stream moves
            xd_all = [dense.blocks[b](x, mask_d) for x in xd_all]
            continue
        bd, bs = dense.blocks[b], student.blocks[nb]
        for fit in plans.get(b, []):
            lin = fit.lin
            fan_out = None if target == "self" else lin.out_features
            stats = LstsqStats.zeros(lin.in_features, fan_out, lin.bias is not None, device)
            for i, xs in enumerate(xs_all):
                cap_s = _run_block(bs, xs, mask_s, fit.stage)
                x_in = cap_s.get(fit.stage + ".in")
                if x_in is None:  # zero-width branch: only the bias is fitted
                    x_in = xs.new_zeros(*xs.shape[:-1], 0)
                if target == "self":
                    stats.add(x_in)
                    continue
                xd = xd_all[i]
                cap_d = _run_block(bd, xd, mask_d, fit.stage)
                stats.add(x_in, _target(fit, target, cap_d, cap_s, xd, xs))
            stats.all_reduce_()
            if target == "self":  # dense weights on the student's own inputs: C = W_dense H
                wd = _weight_aug(fit.dense_lin)
                stats.cross = wd @ stats.gram
                stats.tsq = ((wd @ stats.gram) * wd).sum()
            layers.append(_solve_and_write(fit, stats, damping))
        xd_all = [bd(x, mask_d) for x in xd_all] if need_dense else []
        xs_all = [bs(x, mask_s) for x in xs_all]
    return layers


def _solve_and_write(fit: _Fit, stats: LstsqStats, damping: float) -> dict[str, Any]:
    before = _weight_aug(fit.lin)
    if fit.keep is None:
        new, lam = solve_lstsq(stats.gram, stats.cross, damping)
    else:
        keep = fit.keep.to(stats.gram.device)
        if fit.lin.bias is not None:
            keep = torch.cat([keep, torch.ones(keep.shape[0], 1, dtype=torch.bool, device=keep.device)], dim=1)
        new, lam = solve_masked_rows(stats.gram, stats.cross, keep, damping)
    _write(fit.lin, new)
    return {
        "layer": fit.name,
        "dense_layer": fit.dense_name,
        "shape": [fit.lin.out_features, fit.lin.in_features],
        "tokens": stats.count,
        "rel_error_before": stats.relative(before),
        "rel_error_after": stats.relative(new),
        "damping": damping,
        "damping_abs": lam,
    }


def _check_target(target: str, allowed: Sequence[str]) -> None:
    if target not in allowed:
        raise VitPruneError(f"unknown reconstruction target {target!r} (expected one of {', '.join(allowed)})")


# ============================================================================================ structural
def _block_map(dense: ViT, pruned: ViT, masks: StructuralMasks) -> list[tuple[int, int | None]]:
    """Check that ``pruned`` is ``masks`` applied to ``dense``; ``[(dense block, pruned block or None)]``."""
    masks.validate(dense.config)
    want = architecture_after(dense.config, masks)
    got = pruned.config
    shape = [(c.heads, c.qk_dim, c.v_dim, c.mlp_dim) for c in want.blocks]
    if want.embed_dim != got.embed_dim or shape != [(c.heads, c.qk_dim, c.v_dim, c.mlp_dim) for c in got.blocks]:
        raise VitPruneError(
            "the pruned model's architecture does not match the masks (pass the masks prune_model used; after "
            "round_to, the rounded masks from structures.surgery.round_masks)"
        )
    pairs, nb = [], 0
    for b, bm in enumerate(masks.blocks):
        pairs.append((b, nb if bm.keep else None))
        nb += int(bm.keep)
    return pairs


def _kept_index(dense: ViT, masks: StructuralMasks, b: int) -> dict[str, Tensor]:
    """Dense indices of what block ``b`` keeps: qkv rows, proj columns, MLP neurons (surgery's order)."""
    cfg, bm = dense.config.blocks[b], masks.blocks[b]
    mlp = torch.nonzero(bm.mlp).flatten()
    if effective_block(bm, cfg)[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return {"qkv": empty, "proj": empty, "mlp": mlp}
    hk, jq, jv = (torch.nonzero(getattr(bm, f)).flatten() for f in ("heads", "qk", "v"))
    rows = torch.cat([qkv_rows(cfg, "q", hk, jq), qkv_rows(cfg, "k", hk, jq), qkv_rows(cfg, "v", hk, jv)])
    return {"qkv": rows, "proj": proj_cols(cfg, hk, jv), "mlp": mlp}


@torch.no_grad()
def reconstruct_structural(
    dense: ViT,
    pruned: ViT,
    masks: StructuralMasks,
    batches: Iterable,
    *,
    num_images: int = 256,
    damping: float = 1e-3,
    sequential: bool = True,
    target: str = "residual",
    refit_inputs: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> tuple[ViT, dict[str, Any]]:
    """Re-solve ``proj`` and ``fc2`` (kept columns and bias; with ``refit_inputs`` also the kept rows of ``qkv``
    and ``fc1``) of the physically pruned model ``pruned`` (= ``surgery.prune_model(dense, masks)``), in place.

    ``sequential=True``: block by block on the pruned model's own inputs (blocks < b already reconstructed),
    ``W' = C (H + lam I)^-1`` against ``target`` (``"layer"`` or ``"residual"``, module docstring).
    ``sequential=False``: dense activations only, ``W_K' = W_K + W_S H_SK H_KK^-1`` (starts from the dense weights;
    ``target`` and ``refit_inputs`` do not apply). ``damping`` is relative to ``mean(diag H)``; ``num_images``
    calibration images are taken from ``batches`` (images or ``(images, labels)``), per rank under torchrun.
    Returns ``(pruned, report)``; the report lists per layer the relative error ``||T - X W^T||^2 / ||T||^2``
    before and after, on the same calibration tokens, and the damping used.
    """
    _check_target(target, TARGETS)
    dev = _device_of(pruned, device, dense)
    pairs = _block_map(dense, pruned, masks)
    e = torch.nonzero(masks.emb).flatten().to(dev)
    d_was, s_was = dense.training, pruned.training
    dense.eval()
    pruned.eval()
    t0 = time.perf_counter()
    try:
        if sequential:
            plans: dict[int, list[_Fit]] = {}
            for b, nb in pairs:
                if nb is None:
                    continue
                idx = {k: v.to(dev) for k, v in _kept_index(dense, masks, b).items()}
                bd, bs = dense.blocks[b], pruned.blocks[nb]
                pd, ps = f"blocks.{b}.", f"blocks.{nb}."
                fits = []
                if refit_inputs and bs.attn.qkv.out_features:
                    fits.append(_Fit("qkv", ps + "attn.qkv", pd + "attn.qkv", bs.attn.qkv, bd.attn.qkv, idx["qkv"]))
                fits.append(_Fit("proj", ps + "attn.proj", pd + "attn.proj", bs.attn.proj, bd.attn.proj, e))
                if refit_inputs and bs.mlp.fc1.out_features:
                    fits.append(_Fit("fc1", ps + "mlp.fc1", pd + "mlp.fc1", bs.mlp.fc1, bd.mlp.fc1, idx["mlp"]))
                fits.append(_Fit("fc2", ps + "mlp.fc2", pd + "mlp.fc2", bs.mlp.fc2, bd.mlp.fc2, e))
                plans[b] = fits
            layers = _sequential(dense, pruned, pairs, plans, batches, num_images, damping, target, dev, batch_size)
        else:
            layers = _structural_oneshot(dense, pruned, masks, pairs, batches, num_images, damping, dev, e)
    finally:
        dense.train(d_was)
        pruned.train(s_was)
    report = {
        "mode": "sequential" if sequential else "dense-inputs",
        "target": target if sequential else "layer",
        "refit_inputs": bool(refit_inputs and sequential),
        "damping": damping,
        "num_images": num_images,
        "layers": layers,
        "time_s": time.perf_counter() - t0,
    }
    return pruned, report


def _dense_grams(
    model: nn.Module, names: Sequence[str], batches: Iterable, num_images: int, device: torch.device
) -> dict[str, LstsqStats]:
    """Augmented input Grams of the named linears over full forwards of ``model`` (all-reduced)."""
    modules = dict(model.named_modules())
    stats = {n: LstsqStats.zeros(modules[n].in_features, None, modules[n].bias is not None, device) for n in names}

    def make(name: str):
        def hook(_m, args, _out):
            stats[name].add(args[0])

        return hook

    handles = [modules[n].register_forward_hook(make(n)) for n in names]
    try:
        for images in _images(batches, num_images, device):
            model(images)
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        s.all_reduce_()
    return stats


def _structural_oneshot(dense, pruned, masks, pairs, batches, num_images, damping, dev, e) -> list[dict[str, Any]]:
    names = [f"blocks.{b}.{leaf}" for b, nb in pairs if nb is not None for leaf in ("attn.proj", "mlp.fc2")]
    names = [n for n in names if dict(dense.named_modules())[n].in_features > 0]
    grams = _dense_grams(dense, names, batches, num_images, dev)
    modules_d, modules_s = dict(dense.named_modules()), dict(pruned.named_modules())
    layers = []
    for b, nb in pairs:
        if nb is None:
            continue
        idx = _kept_index(dense, masks, b)
        for leaf, cols in (("attn.proj", idx["proj"]), ("mlp.fc2", idx["mlp"])):
            name = f"blocks.{b}.{leaf}"
            if name not in grams:
                continue
            st = grams[name]
            lin_s = modules_s[f"blocks.{nb}.{leaf}"]
            w = _weight_aug(modules_d[name], e)  # dense rows of the kept channels
            keep = torch.zeros(st.gram.shape[0], dtype=torch.bool, device=dev)
            keep[cols.to(dev)] = True
            keep[-1] = True  # the bias column
            new, lam = compensate_columns(w, st.gram, keep, damping)
            k = torch.nonzero(keep).flatten()
            # report on the kept-input problem: target X W^T (dense), inputs X_K
            sub = LstsqStats(st.gram[k][:, k], w @ st.gram[:, k], ((w @ st.gram) * w).sum(), st.count, True)
            before = _weight_aug(lin_s)
            _write(lin_s, new)
            layers.append(
                {
                    "layer": f"blocks.{nb}.{leaf}",
                    "dense_layer": name,
                    "shape": [lin_s.out_features, lin_s.in_features],
                    "tokens": st.count,
                    "rel_error_before": sub.relative(before),
                    "rel_error_after": sub.relative(new),
                    "damping": damping,
                    "damping_abs": lam,
                }
            )
    return layers


# ============================================================================================ unstructured
@torch.no_grad()
def reconstruct_unstructured(
    dense: ViT,
    sparse: ViT,
    masks: dict[str, Tensor],
    batches: Iterable,
    *,
    num_images: int = 256,
    damping: float = 1e-3,
    sequential: bool = True,
    target: str = "layer",
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> tuple[ViT, dict[str, Any]]:
    """Re-solve every masked linear's kept weights (and bias) of ``sparse`` in place, keeping ``masks`` exactly
    (``{'blocks.b.attn.qkv.weight': bool keep (out, in)}``, as ``SparsePruneResult.masks``).

    Per output row ``w_r,K = C_r,K (H_KK + lam I)^-1`` (:func:`solve_masked_rows`; SparseGPT eq. 1 with the mask
    fixed). ``sequential=True``: block by block in the order qkv, proj, fc1, fc2 on ``sparse``'s own inputs
    (earlier layers already re-solved) against ``target``: ``"layer"`` (dense layer on the dense stream),
    ``"residual"`` (for proj / fc2: dense stream minus the sparse one, as in :func:`reconstruct_structural`; qkv /
    fc1 use the layer target) or ``"self"`` (the dense weights on the sparse model's inputs, SparseGPT's
    objective). ``sequential=False``: dense inputs and dense outputs (``C = W H``). Linears outside ``blocks`` are
    not handled. Returns ``(sparse, report)``.
    """
    _check_target(target, UNSTRUCTURED_TARGETS)
    dev = _device_of(sparse, device, dense)

    def arch(c) -> list:
        return [c.embed_dim] + [(b.heads, b.qk_dim, b.v_dim, b.mlp_dim) for b in c.blocks]

    if arch(dense.config) != arch(sparse.config):
        raise VitPruneError("unstructured reconstruction needs the dense and sparse models to share one architecture")
    mods_d, mods_s = dict(dense.named_modules()), dict(sparse.named_modules())
    fits_by_block: dict[int, list[_Fit]] = {}
    order = {"attn.qkv": 0, "attn.proj": 1, "mlp.fc1": 2, "mlp.fc2": 3}
    for pname, keep in masks.items():
        mod = pname[: -len(".weight")] if pname.endswith(".weight") else pname
        parts = mod.split(".")
        leaf = ".".join(parts[2:])
        if parts[0] != "blocks" or leaf not in order or mod not in mods_s:
            raise VitPruneError(f"cannot reconstruct {pname!r}: only blocks.*.attn.qkv/proj and mlp.fc1/fc2")
        lin = mods_s[mod]
        if tuple(keep.shape) != tuple(lin.weight.shape):
            raise VitPruneError(f"mask {pname} has shape {tuple(keep.shape)}, weight {tuple(lin.weight.shape)}")
        stage = leaf.split(".")[1]
        fits_by_block.setdefault(int(parts[1]), []).append(
            _Fit(stage, mod, mod, lin, mods_d[mod], None, keep.to(dev, torch.bool))
        )
    for fits in fits_by_block.values():
        fits.sort(key=lambda f: order[f.name.split(".", 2)[2]])
    d_was, s_was = dense.training, sparse.training
    dense.eval()
    sparse.eval()
    t0 = time.perf_counter()
    try:
        if sequential:
            pairs = [(b, b) for b in range(len(dense.blocks))]
            layers = _sequential(
                dense, sparse, pairs, fits_by_block, batches, num_images, damping, target, dev, batch_size
            )
        else:
            names = [f.name for b in sorted(fits_by_block) for f in fits_by_block[b]]
            grams = _dense_grams(dense, names, batches, num_images, dev)
            layers = []
            for b in sorted(fits_by_block):
                for fit in fits_by_block[b]:
                    st = grams[fit.name]
                    wd = _weight_aug(fit.dense_lin)
                    st.cross = wd @ st.gram
                    st.tsq = (st.cross * wd).sum()
                    layers.append(_solve_and_write(fit, st, damping))
    finally:
        dense.train(d_was)
        sparse.train(s_was)
    report = {
        "mode": "sequential" if sequential else "dense-inputs",
        "target": target if sequential else "self",
        "damping": damping,
        "num_images": num_images,
        "layers": layers,
        "time_s": time.perf_counter() - t0,
    }
    return sparse, report


# ============================================================================================ ranking
@torch.no_grad()
def reconstruction_scores(
    model: ViT,
    batches: Iterable,
    *,
    num_images: int = 256,
    damping: float = 1e-3,
    kinds: Sequence[str] = SCORE_KINDS,
    masks: StructuralMasks | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Tensor]:
    """Reconstruction-aware saliency: per structural unit, the ZipLM cost of removing it with optimal least-squares
    compensation of the layer it feeds, ``tr(W_S ([H^-1]_SS)^-1 W_S^T) / tokens`` (ZipLM eq. 4, :func:`group_obs_cost`;
    ``H`` the augmented input Gram of that layer over calibration tokens of ``model`` — the full-size model, with
    or without gates — so the bias is refitted too).

    Returned in NViT's ``scores`` format, ``{groups.unit_key(kind, b): float64 (units,)}``, for ``kinds`` among
    ``heads`` (the head's ``proj`` columns, exact group cost), ``v`` (V dim j of every head: ``proj`` columns
    ``h * dv + j``, exact group cost) and ``mlp`` (``fc2`` column j: ``||W_:,j||^2 / [H^-1]_jj``). Units already
    removed by ``masks`` (default: the model's gates) score 0, and costs are relative to the kept columns. A
    chunk of several units removed together costs more than the sum of its units' scores when they are
    correlated (NViT's selection sums unit scores per chunk: an approximation); :func:`group_obs_cost` gives the
    exact cost of any given chunk. QK dims (through a softmax) and embedding channels (in every layer) have no
    such closed form and are not scored. Costs are mean squared errors per token of the residual stream, so
    the kinds are comparable with each other, not with NViT's loss-change scores.
    """
    bad = [k for k in kinds if k not in SCORE_KINDS]
    if bad:
        raise VitPruneError(f"reconstruction scores cover {', '.join(SCORE_KINDS)}, not {', '.join(bad)}")
    dev = _device_of(model, device)
    masks = StructuralMasks.from_model(model) if masks is None else masks
    masks.validate(model.config)
    names = []
    for b, cfg in enumerate(model.config.blocks):
        if {"heads", "v"} & set(kinds) and cfg.heads * cfg.v_dim:
            names.append(f"blocks.{b}.attn.proj")
        if "mlp" in kinds and cfg.mlp_dim:
            names.append(f"blocks.{b}.mlp.fc2")
    was = model.training
    model.eval()
    try:
        grams = _dense_grams(model, names, batches, num_images, dev)
    finally:
        model.train(was)
    mods = dict(model.named_modules())
    e = torch.nonzero(masks.emb).flatten().to(dev)  # removed embedding channels are not compared
    out: dict[str, Tensor] = {}
    for b, (cfg, bm) in enumerate(zip(model.config.blocks, masks.blocks, strict=True)):
        sizes = {"heads": cfg.heads, "v": cfg.v_dim, "mlp": cfg.mlp_dim}
        for kind in kinds:
            out[unit_key(kind, b)] = torch.zeros(sizes[kind], dtype=_F64)
        if not bm.keep:
            continue
        proj = grams.get(f"blocks.{b}.attn.proj")
        if proj is not None and effective_block(bm, cfg)[0] > 0:
            keep = torch.zeros(proj.gram.shape[0], dtype=torch.bool)
            keep[proj_cols(cfg, torch.nonzero(bm.heads).flatten(), torch.nonzero(bm.v).flatten())] = True
            keep[-1] = True
            w = _weight_aug(mods[f"blocks.{b}.attn.proj"], e)
            cols = torch.arange(cfg.heads * cfg.v_dim).view(cfg.heads, cfg.v_dim)
            if "heads" in kinds:
                cost = group_obs_cost(w, proj.gram, list(cols), damping, keep).cpu() / proj.count
                out[unit_key("heads", b)] = cost * bm.heads
            if "v" in kinds:
                cost = group_obs_cost(w, proj.gram, list(cols.T), damping, keep).cpu() / proj.count
                out[unit_key("v", b)] = cost * bm.v
        fc2 = grams.get(f"blocks.{b}.mlp.fc2")
        if fc2 is not None and bool(bm.mlp.any()):
            keep = torch.cat([bm.mlp, torch.ones(1, dtype=torch.bool)]).to(fc2.gram.device)
            k = torch.nonzero(keep).flatten()
            hinv, _ = _hinv(fc2.gram[k][:, k], damping)
            w = _weight_aug(mods[f"blocks.{b}.mlp.fc2"], e)[:, k]
            single = (w.pow(2).sum(0) / hinv.diagonal())[:-1].cpu() / fc2.count  # OBS eq. 5 per column
            score = torch.zeros(cfg.mlp_dim, dtype=_F64)
            score[bm.mlp] = single
            out[unit_key("mlp", b)] = score
    return out
