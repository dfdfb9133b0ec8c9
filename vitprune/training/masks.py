"""Unstructured weight masks held exactly at zero during training.

Structural masks are gates on the model (``vit.py`` buffers) and need nothing here; this module is for
element-wise sparsity (magnitude, OBS, Wanda, SparseGPT, N:M). The :class:`~vitprune.training.engine.Trainer`
masks the gradients before clipping and the optimizer step and re-applies the mask to the weights after
every step, so neither AdamW's momentum nor its decoupled weight decay can move a pruned weight off zero.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError


class WeightMasks:
    """``{parameter name: bool tensor of the parameter's shape}``; True keeps a weight, False prunes it."""

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self.masks: dict[str, Tensor] = {}
        for name, m in masks.items():
            m = torch.as_tensor(m)
            if m.dtype != torch.bool:
                if not bool(((m == 0) | (m == 1)).all()):
                    raise VitPruneError(f"mask for {name} must be boolean (or 0/1)")
                m = m.bool()
            self.masks[name] = m.detach().cpu()

    def __len__(self) -> int:
        return len(self.masks)

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __getitem__(self, name: str) -> Tensor:
        return self.masks[name]

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.masks.items())

    def _pairs(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        params = dict(model.named_parameters())
        for name, m in self.masks.items():
            p = params.get(name)
            if p is None:
                raise VitPruneError(f"mask names a parameter the model does not have: {name}")
            if tuple(p.shape) != tuple(m.shape):
                raise VitPruneError(f"mask for {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
            yield name, p, m.to(p.device)

    def validate(self, model: nn.Module) -> WeightMasks:
        """Check every name and shape against ``model``; returns ``self``."""
        for _ in self._pairs(model):
            pass
        return self

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Set every pruned weight of ``model`` to exactly zero (in place); returns ``model``."""
        for _, p, m in self._pairs(model):
            p.masked_fill_(~m, 0.0)
        return model

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        """Zero the gradient of every pruned weight (call after backward, before clipping/stepping)."""
        for _, p, m in self._pairs(model):
            if p.grad is not None:
                p.grad.masked_fill_(~m, 0.0)

    @torch.no_grad()
    def mask_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero per-element optimizer state (e.g. AdamW moments) of pruned weights."""
        for _, p, m in self._pairs(model):
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(~m, 0.0)

    def sparsity(self) -> float:
        """Fraction of masked-out elements over all masked parameters."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.masks)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> WeightMasks:
        return cls(state)

    @classmethod
    def from_model_zeros(cls, model: nn.Module, names: list[str] | None = None) -> WeightMasks:
        """Masks that keep exactly the non-zero entries of the named parameters (all >= 2-D ones by default)."""
        params = dict(model.named_parameters())
        names = names if names is not None else [n for n, p in params.items() if p.ndim >= 2]
        return cls({n: params[n].detach() != 0 for n in names})
