"""Does the NViT saliency I(S) = 1/2 E[(sum_S g w)^2] rank groups by their true loss change? (real model + data)

On the shared ViT-Tiny (Tiny-ImageNet 200): accumulate I(S) over training batches (cross-entropy on labels),
then remove sampled groups of every kind one at a time (heads, QK dims, V dims, MLP neurons, embedding channels,
whole blocks) and measure the loss change on a fixed held-out set (the val images, ``--val-per-class`` per class).
Reports Spearman rank correlations overall and per kind, against the signed and the absolute loss change, and the
same for a magnitude baseline (squared L2 norm of the group's weights).

Block inputs of the held-out set are cached, so removing a group of block b only re-runs blocks b..11.

    python benchmarks/nvit_saliency_correlation.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch
import torch.nn.functional as F
from _common import markdown_table, shared_data, shared_model, write_results
from scipy.stats import spearmanr

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.models.checkpoints import load_model
from vitprune.scoring.hessian import compute_saliency
from vitprune.structures import KINDS, enumerate_groups, group_slices, zero_group


def _tail_logits(model, x, start: int) -> torch.Tensor:
    """Logits from the input of block ``start`` on (no masks)."""
    for blk in model.blocks[start:]:
        x = blk(x)
    return model.forward_head(model.norm(x))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--train", default=str(shared_data() / "train"))
    ap.add_argument("--val", default=str(shared_data() / "val"))
    ap.add_argument("--batches", type=int, default=8, help="saliency batches")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=1, help="held-out images per class for the loss")
    ap.add_argument("--per-kind", type=int, default=12, help="groups sampled per kind (all blocks: 12)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="nvit_saliency_correlation")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)

    model = load_model(args.model).eval()
    tf = build_eval_transform("shared")
    train = ImageFolderDataset(args.train, tf, args.classes)
    loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    t0 = time.perf_counter()
    scores = compute_saliency(model, loader, args.batches, mode="labels", progress=sys.stderr.isatty())
    t_sal = time.perf_counter() - t0

    val = ImageFolderDataset(args.val, tf, args.classes, limit_per_class=args.val_per_class)
    xs, ys = zip(*[val[i] for i in range(len(val))], strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    with torch.inference_mode():
        h = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], 1) + model.pos_embed
        cached = []
        for blk in model.blocks:
            cached.append(h)
            h = blk(h)
        base_loss = F.cross_entropy(model.forward_head(model.norm(h)), y).item()

    rng = random.Random(args.seed)
    groups = []
    for kind in KINDS:
        pool = enumerate_groups(model.config, kinds=[kind])
        groups += rng.sample(pool, min(args.per_kind, len(pool)))
    params = dict(model.named_parameters())
    rows = []
    t0 = time.perf_counter()
    for i, g in enumerate(groups):
        m = copy.deepcopy(model) if g.kind == "emb" else model
        saved = []
        if g.kind == "emb":
            zero_group(m, g)
        else:  # zero in place, restore after
            for s in group_slices(model.config, g):
                saved.append((s, params[s.name].detach().index_select(s.dim, s.index).clone()))
            zero_group(m, g)
        with torch.inference_mode():
            logits = m(x) if g.kind == "emb" else _tail_logits(m, cached[g.block], g.block)
            loss = F.cross_entropy(logits, y).item()
        with torch.no_grad():
            for s, value in saved:
                params[s.name].index_copy_(s.dim, s.index, value)
        magnitude = sum(
            float(params[s.name].detach().index_select(s.dim, s.index).double().square().sum())
            for s in group_slices(model.config, g)
        )
        rows.append(
            {
                "kind": g.kind,
                "block": g.block,
                "index": g.index,
                "saliency": float(scores[g.key][g.index]),
                "loss_change": loss - base_loss,
                "magnitude": magnitude,
            }
        )
        if sys.stderr.isatty():
            print(f"\r{i + 1}/{len(groups)} groups", end="", file=sys.stderr)
    t_loss = time.perf_counter() - t0

    def rho(sel, key, target):
        a = [r[key] for r in sel]
        b = [abs(r["loss_change"]) if target == "abs" else r["loss_change"] for r in sel]
        return float(spearmanr(a, b)[0]) if len(sel) > 2 else float("nan")

    summary = {}
    for kind in ("all", *KINDS):
        sel = rows if kind == "all" else [r for r in rows if r["kind"] == kind]
        summary[kind] = {
            "n": len(sel),
            "spearman_saliency_vs_dloss": rho(sel, "saliency", "signed"),
            "spearman_saliency_vs_abs_dloss": rho(sel, "saliency", "abs"),
            "spearman_magnitude_vs_dloss": rho(sel, "magnitude", "signed"),
            "mean_dloss": sum(r["loss_change"] for r in sel) / max(len(sel), 1),
        }
    record = {
        "model": args.model,
        "saliency": {"mode": "labels", "batches": args.batches, "batch_size": args.batch_size, "time_s": t_sal},
        "held_out": {"images": len(x), "per_class": args.val_per_class, "dense_loss": base_loss},
        "per_kind_sampled": args.per_kind,
        "summary": summary,
        "groups": rows,
        "time_s": {"saliency": t_sal, "loss_changes": t_loss, "total": time.perf_counter() - t_start},
    }
    table = markdown_table(
        ["groups", "n", "Spearman I(S) vs dL", "Spearman I(S) vs abs(dL)", "Spearman w^2 vs dL", "mean dL"],
        [
            [
                k,
                s["n"],
                s["spearman_saliency_vs_dloss"],
                s["spearman_saliency_vs_abs_dloss"],
                s["spearman_magnitude_vs_dloss"],
                round(s["mean_dloss"], 4),
            ]
            for k, s in summary.items()
        ],
    )
    md = (
        "# NViT saliency vs true loss change (shared ViT-Tiny, Tiny-ImageNet)\n\n"
        f"I(S) from {args.batches} training batches of {args.batch_size} (cross-entropy on labels); loss change of "
        f"removing each group measured on {len(x)} held-out val images (dense loss {base_loss:.4f}).\n\n{table}\n"
    )
    path = write_results(args.name, record, md)
    print(table)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
