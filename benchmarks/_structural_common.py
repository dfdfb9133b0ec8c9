"""What every structural-pruning benchmark does the same way: dense model, val subset, top-1, side-by-side speed.

- :func:`load_dense` — the shared ViT-Tiny (Tiny-ImageNet, 200 classes) as our :class:`~vitprune.models.ViT`;
- :func:`val_loader` — the shared val split (optionally the first N images per class), "shared" preprocessing;
- :func:`top1` — :func:`vitprune.metrics.evaluate.evaluate` without a progress bar;
- :func:`speed_side_by_side` — every model timed round-robin with the dense one in ONE run per batch size
  (:func:`vitprune.metrics.latency.compare_many`), speed-ups = dense median / model median;
- :func:`describe` — MACs (fraction of dense), parameters and the per-block shape of a pruned model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import shared_data, shared_model
from torch import nn
from torch.utils.data import DataLoader

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics.evaluate import evaluate
from vitprune.metrics.flops import count_macs, count_params
from vitprune.metrics.latency import compare_many
from vitprune.models import ViT
from vitprune.models.checkpoints import load_model


def load_dense(path: str | os.PathLike | None = None) -> ViT:
    return load_model(str(path or shared_model() / "model.safetensors")).eval()


def val_loader(
    limit_per_class: int | None = None,
    batch_size: int = 50,
    workers: int = 0,
    root: str | os.PathLike | None = None,
    classes_file: str | os.PathLike | None = None,
) -> DataLoader:
    """Shared val split in file order (``limit_per_class`` keeps the first N of each class)."""
    root = Path(root) if root is not None else shared_data() / "val"
    classes_file = Path(classes_file) if classes_file is not None else shared_model() / "classes.txt"
    ds = ImageFolderDataset(root, build_eval_transform("shared"), classes_file, limit_per_class)
    return make_loader(ds, batch_size, workers=workers)


def top1(model: nn.Module, loader: DataLoader) -> dict[str, Any]:
    return evaluate(model, loader, progress=False)


def describe(model: ViT, dense_macs: int | None = None) -> dict[str, Any]:
    """``{"macs", "macs_fraction", "params", "embed_dim", "blocks": [[heads, qk, v, mlp], ...]}``."""
    macs = count_macs(model)["total"]
    c = model.config
    return {
        "macs": macs,
        "macs_fraction": macs / dense_macs if dense_macs else None,
        "params": count_params(model),
        "embed_dim": c.embed_dim,
        "blocks": [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in c.blocks],
    }


def speed_side_by_side(
    models: dict[str, nn.Module],
    baseline: str = "dense",
    batch_sizes: Sequence[int] = (32, 1),
    runs: dict[int, int] | None = None,
    warmup: int = 2,
    threads: int | None = None,
) -> dict[int, dict[str, Any]]:
    """For each batch size, one round-robin run of all ``models``: ``{bs: compare_many(...) without raw times}``.

    ``runs`` maps a batch size to its number of rounds (default: 8 at batch >= 8, 30 at smaller batches).
    """
    out: dict[int, dict[str, Any]] = {}
    for bs in batch_sizes:
        n = (runs or {}).get(bs, 8 if bs >= 8 else 30)
        res = compare_many(models, batch_size=bs, threads=threads, warmup=warmup, runs=n, baseline=baseline)
        for stats in res["models"].values():
            stats.pop("times_ms", None)
        out[bs] = res
    return out
