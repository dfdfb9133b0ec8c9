"""Device selection."""

from __future__ import annotations

import torch

from vitprune.errors import VitPruneError


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/'auto' -> cuda if available else cpu; refuse a device that is not present."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise VitPruneError(f"unknown device: {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitPruneError("device 'cuda' requested but no CUDA GPU is available")
    return dev
