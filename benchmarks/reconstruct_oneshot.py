"""One-shot NViT at 50 % MACs on the shared ViT-Tiny, then closed-form layer-wise reconstruction (issue #14).

NViT (:class:`vitprune.pruners.nvit.NViTPruner`, no training) chooses the structural masks from Hessian-aware
saliencies on TRAINING images; :func:`vitprune.pruners.reconstruct.reconstruct_structural` then re-solves
``proj`` / ``fc2`` (optionally the kept rows of ``qkv`` / ``fc1``) on ``--calib`` other training images. Top-1 is
measured on a tuning split of the training folder (the first ``--tune-per-class`` images of every class, disjoint
from the saliency and calibration images) - where settings are chosen - and, with ``--val-per-class``, reported on
the validation set (with a 95 % confidence interval) for the settings given.

    python benchmarks/reconstruct_oneshot.py --calib 64 --tune-per-class 1 --prune-steps 1 --batches-per-step 1 \\
        --variants seq-residual --out-name reconstruct_smoke                                   # smoke
    python benchmarks/reconstruct_oneshot.py --calib 512 --tune-per-class 5 --threads 2       # the measurement
    python benchmarks/reconstruct_oneshot.py --masks runs/nvit50_masks.json --variants seq-residual \
        --damping 1e-4 1e-2 --out-name reconstruct_oneshot_damping     # NViT once (masks saved), then reuse them
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import cached_batches, ci95, loadavg, markdown_table, shared_data, shared_model, write_results
from _recovery import split_train
from torch.utils.data import Subset

from vitprune import pruners
from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics.evaluate import evaluate
from vitprune.metrics.flops import count_macs
from vitprune.models.checkpoints import load_model
from vitprune.pruners.reconstruct import reconstruct_structural
from vitprune.structures import surgery
from vitprune.structures.masks import StructuralMasks
from vitprune.training.runinfo import machine_info

VARIANTS = {  # name -> (sequential, target, refit_inputs)
    "dense-inputs": (False, "layer", False),
    "seq-layer": (True, "layer", False),
    "seq-residual": (True, "residual", False),
    "seq-residual-refit": (True, "residual", True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--macs", type=float, default=0.5, help="kept fraction of dense MACs")
    ap.add_argument("--calib", type=int, default=512, help="calibration images for the reconstruction")
    ap.add_argument("--tune-per-class", type=int, default=5, help="tuning images per class (first N in file order)")
    ap.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--damping", type=float, nargs="+", default=[1e-3], help="relative damping(s) to try")
    ap.add_argument("--prune-steps", type=int, default=10)
    ap.add_argument("--batches-per-step", type=int, default=8)
    ap.add_argument("--criterion", choices=("saliency", "per_cost"), default="per_cost")
    ap.add_argument("--scoring", choices=("hessian", "reconstruction"), default="hessian", help="NViT unit scores")
    ap.add_argument("--kinds", default="heads,qk,v,mlp,emb,block", help="structures NViT may remove")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--masks", default=None, help="JSON of NViT's final (rounded) masks: read if present, else written")
    ap.add_argument("--val-per-class", type=int, default=0, help="also report on N val images per class (25: all)")
    ap.add_argument("--out-name", default="reconstruct_oneshot")
    return ap.parse_args(argv)


def endless(ds, batch_size: int, seed: int) -> Iterator:
    epoch = 0
    while True:
        yield from make_loader(ds, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def top1(model, batches) -> float:
    return float(evaluate(model, batches, progress=False)["top1"])


def run_nvit(args, dense, ds, saliency_idx, tune, dense_macs, rows) -> tuple[StructuralMasks, Any]:
    """NViT without training (the registry's pruner); returns its final (rounded) masks and the pruned model."""
    t0 = time.perf_counter()
    res = pruners.create(
        "nvit",
        target_macs=args.macs,
        prune_steps=args.prune_steps,
        batches_per_step=args.batches_per_step,
        round_to=args.round_to or None,
        criterion=args.criterion,
        reconstruct="off",  # this script applies (and compares) the reconstructions itself
        scoring=args.scoring,
        kinds=tuple(args.kinds.split(",")),
        reconstruct_images=args.calib,  # images per round of the reconstruction-aware scores
        seed=args.seed,
        progress=False,
    ).prune(dense, endless(Subset(ds, saliency_idx), args.batch_size, args.seed))
    nvit_s = time.perf_counter() - t0
    base = res.model.eval()
    frac = count_macs(base)["total"] / dense_macs
    rows.append({"name": "nvit one-shot", "top1": top1(base, tune), "macs_fraction": frac, "time_s": nvit_s})
    print(f"nvit one-shot ({frac:.3f} MACs): {rows[-1]['top1']:.2f} in {nvit_s:.0f} s", flush=True)
    return res.masks, base


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), loadavg()
    dense = load_model(str(shared_model() / "model.safetensors")).eval()
    ds = ImageFolderDataset(shared_data() / "train", build_eval_transform("shared"), shared_model() / "classes.txt")
    tune_idx, rest_idx = split_train(ds.samples, args.tune_per_class)
    gen = torch.Generator().manual_seed(args.seed)
    perm = [rest_idx[i] for i in torch.randperm(len(rest_idx), generator=gen).tolist()]
    calib_idx, saliency_idx = perm[: args.calib], perm[args.calib :]
    tune = cached_batches(Subset(ds, tune_idx), 50)
    val = None
    if args.val_per_class:
        val_ds = ImageFolderDataset(
            shared_data() / "val", build_eval_transform("shared"), shared_model() / "classes.txt",
            limit_per_class=args.val_per_class,
        )  # fmt: skip
        val = cached_batches(val_ds, 50)
    calib = cached_batches(Subset(ds, calib_idx), args.batch_size)
    print(f"tuning {len(tune_idx)} images, calibration {len(calib_idx)}, saliency pool {len(saliency_idx)}", flush=True)

    rows: list[dict[str, Any]] = []
    n_val = sum(len(y) for _, y in val) if val is not None else 0

    def on_val(row: dict[str, Any], model) -> None:  # the reported number (settings were chosen on tuning)
        if val is not None:
            row["top1_val"] = top1(model, val)
            row["ci95_val"] = ci95(row["top1_val"], n_val)
            print(f"  {row['name']}: val top-1 {row['top1_val']:.2f} +- {row['ci95_val']:.2f}", flush=True)

    dense_macs = count_macs(dense)["total"]
    rows.append({"name": "dense", "top1": top1(dense, tune), "macs_fraction": 1.0})
    on_val(rows[-1], dense)
    print(f"dense: {rows[-1]['top1']:.2f}", flush=True)

    if args.masks and Path(args.masks).is_file():
        masks = StructuralMasks.from_json(Path(args.masks).read_text())
        base = surgery.prune_model(dense, masks).eval()
        frac = count_macs(base)["total"] / dense_macs
        rows.append({"name": "nvit one-shot", "top1": top1(base, tune), "macs_fraction": frac, "masks": args.masks})
        print(f"nvit one-shot from {args.masks} ({frac:.3f} MACs): {rows[-1]['top1']:.2f}", flush=True)
    else:
        masks, base = run_nvit(args, dense, ds, saliency_idx, tune, dense_macs, rows)
        if args.masks:
            Path(args.masks).write_text(masks.to_json() + "\n")
    frac = rows[-1]["macs_fraction"]
    on_val(rows[-1], base)

    for variant in args.variants:
        sequential, target, refit = VARIANTS[variant]
        for damping in args.damping:
            model = copy.deepcopy(base)
            _, rep = reconstruct_structural(
                dense,
                model,
                masks,
                calib,
                num_images=args.calib,
                damping=damping,
                sequential=sequential,
                target=target,
                refit_inputs=refit,
            )
            layers = rep["layers"]
            row = {
                "name": f"nvit + {variant}",
                "variant": variant,
                "damping": damping,
                "top1": top1(model, tune),
                "macs_fraction": frac,
                "time_s": rep["time_s"],
                "mean_rel_error_before": sum(r["rel_error_before"] for r in layers) / len(layers),
                "mean_rel_error_after": sum(r["rel_error_after"] for r in layers) / len(layers),
                "layers": [
                    {k: r[k] for k in ("layer", "dense_layer", "shape", "rel_error_before", "rel_error_after")}
                    for r in layers
                ],
            }
            rows.append(row)
            on_val(row, model)
            print(f"{row['name']} damping {damping:g}: {row['top1']:.2f} in {rep['time_s']:.0f} s", flush=True)

    record = {
        "benchmark": "reconstruct_oneshot",
        "settings": vars(args),
        "data": {
            "tuning": f"train, first {args.tune_per_class} files per class ({len(tune_idx)} images)",
            "calibration": f"{len(calib_idx)} other train images (seeded permutation)",
            "saliency": "the remaining train images, shuffled",
        },
        "pruned_config": [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in base.config.blocks],
        "embed_dim": base.config.embed_dim,
        "rows": rows,
        "machine_info": machine_info(),
        "loadavg": {"start": load_start, "end": loadavg()},
        "total_s": time.perf_counter() - t_start,
    }
    table = markdown_table(
        [
            "model",
            "damping",
            "top-1 (tuning)",
            "top-1 (val) +- 95 % CI",
            "MACs",
            "mean rel. err before",
            "after",
            "time s",
        ],
        [
            [
                r["name"],
                f"{r['damping']:g}" if "damping" in r else "",
                r["top1"],
                f"{r['top1_val']:.2f} +- {r['ci95_val']:.2f}" if "top1_val" in r else "",
                f"{r['macs_fraction']:.3f}",
                f"{r['mean_rel_error_before']:.3f}" if "layers" in r else "",
                f"{r['mean_rel_error_after']:.3f}" if "layers" in r else "",
                f"{r['time_s']:.0f}" if "time_s" in r else "",
            ]
            for r in rows
        ],
    )
    md = (
        f"# One-shot NViT at {args.macs:g} MACs + closed-form reconstruction (ViT-Tiny, Tiny-ImageNet-200)\n\n"
        f"Top-1 on {len(tune_idx)} TRAINING images held out as a tuning split (where settings are chosen) and on "
        f"{n_val} val images (reported; 95 % normal-approximation interval); calibration "
        f"{len(calib_idx)} other training images; NViT {args.prune_steps} rounds x {args.batches_per_step} "
        f"batches of {args.batch_size} (criterion {args.criterion}), widths rounded to {args.round_to}, no training. "
        "Relative errors are "
        "per re-solved layer, `||T - X W^T||^2 / ||T||^2` on the calibration tokens, averaged over layers.\n\n"
        + table
        + "\n"
    )
    write_results(args.out_name, record, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
