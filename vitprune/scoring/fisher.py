"""Block-diagonal empirical Fisher inverse of prunable linears (oViT / WoodFisher).

Each prunable weight is flattened (row-major, so consecutive entries are consecutive *input* weights of one
output row) and tiled by ``B x B`` diagonal blocks; when ``B`` does not divide the length, the last block is a
smaller remainder block. Per block the estimate is (METHODS.md section 4, oViT section 3 / WoodFisher eq. 5)::

    F = lambda * I + (1/m) * sum_i g_i g_i^T

over ``m`` gradients. Two ways to build ``F^-1`` give the same matrix:

- ``"woodbury"`` (the paper's way): start from ``(1/lambda) I`` and apply one Sherman-Morrison update per
  gradient, ``F^-1 <- F^-1 - (F^-1 g)(F^-1 g)^T / (m + g^T F^-1 g)`` (WoodFisher eq. 6). ``k`` gradients are folded
  at once with the Woodbury identity ``F^-1 <- F^-1 - U (m I_k + G^T U)^-1 U^T`` with ``U = F^-1 G``, which equals
  ``k`` sequential Sherman-Morrison updates; all blocks are updated together with ``bmm``.
- ``"accumulate"`` (default): accumulate ``sum g g^T`` per block with ``bmm`` and invert once at the end by a
  float64 Cholesky. Same memory (``d * B`` numbers), about half the arithmetic, far less round-off when
  ``lambda`` is tiny, and across ranks the sums are simply all-reduced.

``relative=True`` (accumulate mode) sets ``lambda = damp * mean(diag((1/m) sum g g^T))`` over the whole layer,
which makes the dampening independent of the loss and gradient scale (SparseGPT damps ``X^T X`` the same way).

Neither stores the gradients. Memory is ``d * B`` elements for ``d`` weights; :func:`plan_block_size` checks
this before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.errors import VitPruneError
from vitprune.training import distributed as D

FISHER_MODES = ("accumulate", "woodbury")


@dataclass(frozen=True)
class BlockLayout:
    """Tiling of a flattened weight of ``numel`` entries into ``n_full`` blocks of ``block`` plus a remainder."""

    numel: int
    block: int

    @property
    def n_full(self) -> int:
        return self.numel // self.block

    @property
    def rem(self) -> int:
        return self.numel % self.block

    @property
    def groups(self) -> list[tuple[int, int]]:
        """``(count, size)`` of each batch of equal-size blocks."""
        out = [(self.n_full, self.block)] if self.n_full else []
        if self.rem:
            out.append((1, self.rem))
        return out

    def split(self, flat: Tensor) -> list[Tensor]:
        """Flat ``(..., numel)`` -> list of ``(..., count, size)`` views, one per block batch."""
        parts, start = [], 0
        for count, size in self.groups:
            parts.append(flat[..., start : start + count * size].unflatten(-1, (count, size)))
            start += count * size
        return parts

    def merge(self, parts: list[Tensor]) -> Tensor:
        """Inverse of :meth:`split`."""
        return torch.cat([p.flatten(-2) for p in parts], dim=-1)

    def matrix_elements(self) -> int:
        return sum(c * s * s for c, s in self.groups)


def fisher_memory_bytes(numels: Iterable[int], block_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the block-diagonal ``F^-1`` for weights of the given sizes (about ``d * B * itemsize``)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(BlockLayout(n, min(block_size, n)).matrix_elements() for n in numels) * item


def plan_block_size(
    numels: Iterable[int],
    block_size: int,
    max_bytes: float | None,
    multiple_of: int = 1,
    allow_smaller: bool = False,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Return the block size to use: ``block_size`` if it fits ``max_bytes``, else a smaller one when allowed.

    Raises :class:`VitPruneError` (before any allocation) when it does not fit and ``allow_smaller`` is False,
    or when ``block_size`` is not a positive multiple of ``multiple_of`` (N:M needs ``B % M == 0``).
    """
    numels = list(numels)
    if block_size <= 0 or block_size % multiple_of:
        raise VitPruneError(f"block size {block_size} must be a positive multiple of {multiple_of}")
    need = fisher_memory_bytes(numels, block_size, dtype)
    if max_bytes is None or need <= max_bytes:
        return block_size
    if not allow_smaller:
        raise VitPruneError(
            f"Fisher inverse needs {need / 2**30:.2f} GiB at block size {block_size}, over the "
            f"{max_bytes / 2**30:.2f} GiB limit (lower --block-size or raise the memory limit)"
        )
    b = block_size - multiple_of
    while b >= multiple_of:
        if fisher_memory_bytes(numels, b, dtype) <= max_bytes:
            return b
        b -= multiple_of
    raise VitPruneError(f"Fisher inverse does not fit {max_bytes / 2**30:.2f} GiB even at block size {multiple_of}")


class BlockFisherInverse:
    """``F^-1`` of one flattened weight, restricted to ``B x B`` diagonal blocks; see the module docstring.

    Feed gradients with :meth:`update` (shape ``(k, numel)``), call :meth:`finalize` once, then read
    :attr:`blocks` (list of ``(count, size, size)`` tensors, one per block batch of :attr:`layout`).
    """

    def __init__(
        self,
        numel: int,
        block_size: int,
        num_grads: int,
        damp: float,
        mode: str = "accumulate",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        relative: bool = False,
    ) -> None:
        if mode not in FISHER_MODES:
            raise VitPruneError(f"unknown Fisher mode {mode!r} (choose from {', '.join(FISHER_MODES)})")
        if damp <= 0:
            raise VitPruneError(f"Fisher dampening must be positive, got {damp}")
        if num_grads <= 0:
            raise VitPruneError(f"number of gradients must be positive, got {num_grads}")
        if relative and mode == "woodbury":
            raise VitPruneError("relative dampening needs the accumulate Fisher mode (woodbury fixes lambda up front)")
        self.relative = relative
        self.lam = None if relative else float(damp)
        self.layout = BlockLayout(numel, min(block_size, numel))
        self.num_grads, self.damp, self.mode = int(num_grads), float(damp), mode
        self.count = 0
        self.finalized = False
        self.blocks: list[Tensor] = []
        for count, size in self.layout.groups:
            if mode == "woodbury":
                eye = torch.eye(size, dtype=dtype, device=device) / self.damp
                self.blocks.append(eye.expand(count, size, size).clone())
            else:
                self.blocks.append(torch.zeros(count, size, size, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    @torch.no_grad()
    def update(self, grads: Tensor) -> None:
        """Fold ``k`` gradients (rows of ``grads``, shape ``(k, numel)``) into the estimate."""
        if self.finalized:
            raise RuntimeError("update() after finalize()")
        if grads.ndim != 2 or grads.shape[1] != self.layout.numel:
            raise ValueError(f"expected gradients of shape (k, {self.layout.numel}), got {tuple(grads.shape)}")
        self.count += grads.shape[0]
        for blk, part in zip(self.blocks, self.layout.split(grads.to(self.blocks[0].dtype)), strict=True):
            g = part.permute(1, 2, 0)  # (count, size, k)
            if self.mode == "accumulate":
                blk.baddbmm_(g, g.transpose(1, 2))
            else:
                woodbury_update_(blk, g, self.num_grads)

    @torch.no_grad()
    def finalize(self) -> None:
        """All-reduce across ranks (accumulate mode) and invert ``lambda I + S / m`` block by block."""
        if self.finalized:
            return
        dist = D
        if self.mode == "accumulate":
            count = torch.tensor([float(self.count)], dtype=torch.float64)
            if dist.is_distributed():
                dist.all_reduce_sum_(count)
            if count.item() == 0:
                raise VitPruneError("no gradients were collected for the Fisher estimate")
            m = int(count.item())
            for blk in self.blocks:
                if dist.is_distributed():
                    dist.all_reduce_sum_(blk)
            if self.relative:
                diag_sum = sum(float(b.diagonal(dim1=1, dim2=2).double().sum()) for b in self.blocks)
                mean_diag = diag_sum / (self.layout.numel * m)
                self.lam = self.damp * mean_diag if mean_diag > 0 else self.damp
            for blk in self.blocks:
                invert_damped_(blk, self.lam, m)
        self.finalized = True


@torch.no_grad()
def woodbury_update_(finv: Tensor, g: Tensor, m: int) -> None:
    """In place ``F^-1 <- (F + G G^T / m)^-1`` for a batch of blocks (Woodbury identity).

    ``finv``: ``(n, b, b)``; ``g``: ``(n, b, k)``. With ``k == 1`` this is exactly the Sherman-Morrison update
    ``F^-1 - (F^-1 g)(F^-1 g)^T / (m + g^T F^-1 g)`` of WoodFisher eq. 6 / METHODS.md section 4.
    """
    u = torch.bmm(finv, g)  # (n, b, k)
    s = torch.bmm(g.transpose(1, 2), u)  # (n, k, k)
    s.diagonal(dim1=1, dim2=2).add_(m)
    if g.shape[2] == 1:
        finv.baddbmm_(u / s, u.transpose(1, 2), alpha=-1.0)
        return
    chol, info = torch.linalg.cholesky_ex(s.double())
    if bool((info != 0).any()):  # cannot happen for SPD F^-1; keep a safe path for round-off
        x = torch.linalg.solve(s.double(), u.transpose(1, 2).double())
    else:
        x = torch.cholesky_solve(u.transpose(1, 2).double(), chol)
    finv.baddbmm_(u, x.to(finv.dtype), alpha=-1.0)


@torch.no_grad()
def invert_damped_(sums: Tensor, damp: float, m: int, chunk: int = 256) -> None:
    """In place ``sums <- (damp * I + sums / m)^-1`` (float64 Cholesky), ``sums``: ``(n, b, b)``."""
    for start in range(0, sums.shape[0], chunk):
        blk = sums[start : start + chunk]
        f = blk.double() / m
        f.diagonal(dim1=1, dim2=2).add_(damp)
        chol, info = torch.linalg.cholesky_ex(f)
        inv = torch.cholesky_inverse(chol) if not bool((info != 0).any()) else torch.linalg.inv(f)
        blk.copy_(inv)


class FisherInverses:
    """``{layer name: BlockFisherInverse}`` for a set of prunable linears, fed with gradient dicts."""

    def __init__(self, layers: dict[str, BlockFisherInverse], block_size: int) -> None:
        self.layers = layers
        self.block_size = block_size

    @classmethod
    def create(
        cls,
        numels: Mapping[str, int],
        block_size: int,
        num_grads: int,
        damp: float,
        mode: str = "accumulate",
        max_bytes: float | None = None,
        allow_smaller: bool = False,
        multiple_of: int = 1,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        relative: bool = False,
    ) -> FisherInverses:
        """Check memory first (:func:`plan_block_size`), then allocate one estimate per layer."""
        block = plan_block_size(numels.values(), block_size, max_bytes, multiple_of, allow_smaller, dtype)
        layers = {
            name: BlockFisherInverse(n, block, num_grads, damp, mode, dtype, device, relative)
            for name, n in numels.items()
        }
        return cls(layers, block)

    def __getitem__(self, name: str) -> BlockFisherInverse:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def add(self, grads: Mapping[str, Tensor]) -> None:
        """Fold one chunk of gradients ``{name: (k, numel)}``; in woodbury mode, gathered from every rank."""
        dist = D
        for name, g in grads.items():
            if dist.is_distributed() and self.layers[name].mode == "woodbury":
                g = all_gather_rows(g, dist)
            self.layers[name].update(g)

    @property
    def count(self) -> int:
        return min((f.count for f in self.layers.values()), default=0)

    def finalize(self) -> None:
        for f in self.layers.values():
            f.finalize()

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.layers.values())


def all_gather_rows(t: Tensor, dist) -> Tensor:
    """Concatenate ``t`` (same shape on every rank) over ranks using only ``all_reduce_sum_``."""
    world = dist.world_size()
    buf = torch.zeros((world, *t.shape), dtype=t.dtype, device=t.device)
    buf[dist.rank()] = t
    dist.all_reduce_sum_(buf)
    return buf.flatten(0, 1)


def dense_block_fisher_inverse(grads: Tensor, block_size: int, damp: float) -> list[Tensor]:
    """Reference: ``(lambda I + G^T G / m)^-1`` per block by a direct float64 inverse (for tests)."""
    layout = BlockLayout(grads.shape[1], min(block_size, grads.shape[1]))
    m = grads.shape[0]
    out = []
    for part in layout.split(grads.double()):
        g = part.permute(1, 2, 0)
        f = g @ g.transpose(1, 2) / m + damp * torch.eye(part.shape[-1], dtype=torch.float64)
        out.append(torch.linalg.inv(f))
    return out
