"""Atomic training checkpoints that resume bit-identically.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers (so it is read back with
``torch.load(weights_only=True)``): model and optimizer/scheduler/scaler states, the RNG states of python,
numpy and torch (per rank), the data-order position (epoch, batch within the epoch), the step, the weight
masks, the pruner's ``extra_state`` and the training config. It is written to a temporary sibling and moved
into place, so a kill at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitprune.errors import VitPruneError, torch_load_error
from vitprune.utils.fs import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states as plain data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` atomically to ``path`` (replacing the previous checkpoint only once complete)."""
    payload = {"format_version": FORMAT_VERSION, **state}
    with atomic_path(path, overwrite=True) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch reports a failed write (no space, ...) as a RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "write failed"
            raise VitPruneError(f"cannot write {path}: {first}") from None
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    p = Path(path)
    if not p.is_file():
        raise VitPruneError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; torch's text is several lines
        raise VitPruneError(torch_load_error(p, exc)) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise VitPruneError(f"not a vitprune training checkpoint (or an unsupported version): {p}")
    return state


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ between two config dicts (missing on one side counts), ``ignore`` excluded."""
    skip = set(ignore)
    keys = (set(saved) | set(current)) - skip
    return sorted(k for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>"))
