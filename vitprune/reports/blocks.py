"""Per-block architecture tables, the per-block dims plot and JSON reports of pruning runs (NViT, VTP)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vitprune.models.config import ViTConfig
from vitprune.utils.fs import atomic_path, atomic_write_text


def block_dims(config: ViTConfig) -> list[dict[str, int]]:
    """One row per block: heads, per-head QK / V widths, total QK / V widths, MLP width."""
    return [
        {
            "block": i,
            "heads": b.heads,
            "qk_dim": b.qk_dim,
            "v_dim": b.v_dim,
            "qk_total": b.heads * b.qk_dim,
            "v_total": b.heads * b.v_dim,
            "mlp_dim": b.mlp_dim,
        }
        for i, b in enumerate(config.blocks)
    ]


def arch_summary(config: ViTConfig, img_size: int | None = None) -> dict[str, Any]:
    """Parameters, MACs, embedding width and per-block dims of an architecture (JSON-friendly)."""
    from vitprune.metrics.flops import count_macs, count_params

    return {
        "params": int(count_params(config)),
        "macs": int(count_macs(config, img_size)["total"]),
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "blocks": block_dims(config),
    }


def plot_block_dims(
    before: ViTConfig,
    after: ViTConfig,
    path: str | os.PathLike,
    title: str | None = None,
    kept_blocks: list[int] | None = None,
    overwrite: bool = True,
) -> Path:
    """Bar plot of QK width (heads x qk), V width (heads x v) and MLP width per block, dense vs pruned (PNG).

    ``kept_blocks[i]`` is the dense index of pruned block i (default: the first ``after.depth`` blocks); removed
    blocks show as empty. The embedding widths go in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = kept_blocks if kept_blocks is not None else list(range(after.depth))
    if len(kept) != after.depth:
        raise ValueError("kept_blocks must name one dense block per pruned block")
    n = before.depth
    rows = {
        "QK width (heads x qk)": (lambda b: b.heads * b.qk_dim),
        "V width (heads x v)": (lambda b: b.heads * b.v_dim),
        "MLP width": (lambda b: b.mlp_dim),
    }
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.55 * n + 2), 7.5), sharex=True)
    xs = list(range(n))
    for ax, (label, fn) in zip(axes, rows.items(), strict=True):
        dense = [fn(b) for b in before.blocks]
        pruned = [0] * n
        for i, b in zip(kept, after.blocks, strict=True):
            pruned[i] = fn(b)
        ax.bar(xs, dense, color="#d9d9d9", edgecolor="#7f7f7f", label="dense")
        ax.bar(xs, pruned, color="#1f77b4", width=0.6, label="pruned")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("block")
    axes[-1].set_xticks(xs)
    head = title or "per-block dims"
    fig.suptitle(f"{head}  (embedding {before.embed_dim} -> {after.embed_dim}, {after.depth}/{n} blocks)")
    fig.tight_layout()
    p = Path(path)
    with atomic_path(p, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return p


def write_json_report(path: str | os.PathLike, report: dict[str, Any], overwrite: bool = True) -> Path:
    """Write ``report`` as indented JSON, atomically (non-JSON values become strings)."""
    return atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n", overwrite=overwrite)
