"""#5: top-1 of the shared ViT-Tiny at 75 % unstructured sparsity after ONE fixed recovery budget, OBS vs GM.

Pruning (as in ``obs_oneshot.py``): oViT/OBS from one Fisher + trace pass on a fixed seeded random subset of
``tiny-imagenet-200/train`` (``--num-grads`` = 1024 images, one per-sample gradient each; block 128; default
relative dampening and cumulative criterion; one global threshold) and global magnitude (GM), both to
``--sparsity`` (0.75) of the weights of every qkv/proj/fc1/fc2.

Recovery budget (the same for every method, ``_recovery.recover``): distillation from the dense model (soft
KL, ``alpha = 1``, no labels; AdamW, lr 2e-4 with warm-up + cosine over the budget, batch 64) on augmented
training images, stopped by whichever comes first: ``--recover-images`` (200,000 = about two epochs of the
100k train images) or ``--recover-minutes`` (15) of wall-clock training. Both consumed amounts are recorded;
on a busy 2-core CPU the minutes normally bind. The pruned weights are held at exactly zero
(:class:`vitprune.training.WeightMasks` from the zero pattern of the pruned linears); the sparsity is counted
again after recovery.

Evaluation: top-1 on a fixed subset of ``val`` (every ``--val-stride``-th image in sorted order; stride 2 =
2,500 images) with the "shared" preprocessing, for the dense model, each one-shot model and each recovered one.

    python benchmarks/obs_recovery.py --threads 2          # full run (OBS pass ~3 min, evals, 2 x 15 min recovery)
    python benchmarks/obs_recovery.py --num-grads 32 --block-size 32 --val-stride 100 --recover-images 64 \\
        --recover-minutes 0.5 --threads 1 --name obs_recovery_smoke    # smoke test (about a minute)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import cached_batches, loadavg, markdown_table, shared_data, shared_model, write_results
from _recovery import DEFAULTS, build_train_loader, recover
from obs_oneshot import obs_config
from torch import nn
from torch.utils.data import Subset

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics import evaluate
from vitprune.metrics.sparsity import prunable_weight_names, zero_counts
from vitprune.models.checkpoints import load_model
from vitprune.pruners.baselines import prune_baseline
from vitprune.pruners.obs import OBSConfig, OBSSolver, peak_rss_bytes
from vitprune.training import WeightMasks

DENSE_TOP1_FULL_VAL = 69.46
METHODS = ("obs", "gm")


@torch.no_grad()
def mask_held(model: nn.Module, masks: WeightMasks) -> bool:
    """True when every masked-out weight is still exactly zero."""
    params = dict(model.named_parameters())
    return all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--data", default=str(shared_data()))
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--num-grads", type=int, default=1024, help="calibration images = OBS per-sample gradients")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=OBSConfig.damp, help="relative to the mean Fisher diagonal")
    ap.add_argument("--damp-absolute", action="store_true", help="--damp is an absolute lambda")
    ap.add_argument("--criterion", default=OBSConfig.criterion, choices=["cumulative", "marginal"])
    ap.add_argument("--allocation", default="global", choices=["global", "layer"])
    ap.add_argument("--grad-batch", type=int, default=16)
    ap.add_argument("--recover-images", type=int, default=200_000, help="image budget of the recovery")
    ap.add_argument("--recover-minutes", type=float, default=15.0, help="wall-clock budget of the recovery")
    ap.add_argument("--recover-batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--recover-lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--val-stride", type=int, default=2, help="evaluate on every k-th val image (2 -> 2,500)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers of the recovery")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="save each one-shot and recovered model under this folder")
    ap.add_argument("--name", default="obs_recovery", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    if not 0.0 < args.sparsity < 1.0:
        ap.error("--sparsity must be in (0, 1)")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if m in args.methods]
    load_start = loadavg()
    t_start = time.perf_counter()
    root = Path(args.data)
    transform = build_eval_transform("shared")
    dense = load_model(args.model).eval()

    val = ImageFolderDataset(root / "val", transform, args.classes)
    val_sub = Subset(val, list(range(0, len(val), args.val_stride)))
    batches = cached_batches(val_sub, 50)
    dense_eval = evaluate(dense, batches, progress=False)
    print(f"dense top1 {dense_eval['top1']:.2f} on {dense_eval['n']}", flush=True)

    train = ImageFolderDataset(root / "train", transform, args.classes)
    g = torch.Generator().manual_seed(args.seed)
    calib_idx = torch.randperm(len(train), generator=g)[: args.num_grads].tolist()
    calib_loader = make_loader(Subset(train, calib_idx), args.grad_batch, workers=0)

    pruned: dict[str, nn.Module] = {}
    results: dict[str, dict] = {}
    obs_pass = None
    if "obs" in methods:
        cfg = obs_config(args)
        pruner = OBSSolver(dense, cfg)
        t0 = time.perf_counter()
        res = pruner.prune(calib_loader, [args.sparsity])[args.sparsity]
        wall = time.perf_counter() - t0
        obs_pass = {
            "wall_s": wall,
            "fisher_s": pruner.timings["fisher_s"],
            "traces_s": pruner.timings["traces_s"],
            "update_s": res.report["timings_s"]["update_s"],
            "peak_rss_gib": peak_rss_bytes() / 2**30,
            "criterion": cfg.criterion,
            "allocation": cfg.allocation,
            **{k: v for k, v in pruner.info.items() if k != "lambda_per_layer"},
        }
        print(f"OBS pass: {wall:.1f} s ({obs_pass})", flush=True)
        pruned["obs"] = res.model
        results["obs"] = {"method_wall_s": wall, "report_sparsity": res.report["sparsity"]}
        del pruner, res
    if "gm" in methods:
        t0 = time.perf_counter()
        res = prune_baseline(dense, "gm", [args.sparsity])[args.sparsity]
        wall = time.perf_counter() - t0
        pruned["gm"] = res.model
        results["gm"] = {"method_wall_s": wall, "report_sparsity": res.report["sparsity"]}
        print(f"gm: {wall:.1f} s", flush=True)

    masks: dict[str, WeightMasks] = {}
    for method, model in pruned.items():
        masks[method] = WeightMasks.from_model_zeros(model, prunable_weight_names(model)).validate(model)
        r = evaluate(model, batches, progress=False)
        results[method].update(
            oneshot={"top1": r["top1"], "top5": r["top5"], "loss": r["loss"]},
            sparsity_before=zero_counts(model),
            mask_sparsity=masks[method].sparsity(),
        )
        print(f"{method} {args.sparsity:.2f} one-shot: top1 {r['top1']:.2f}", flush=True)
        if args.save_dir:
            from vitprune.models import save

            meta = {args.name: results[method]}
            save(model, f"{args.save_dir}/{method}-s{args.sparsity:g}", overwrite=True, meta=meta)

    for method, model in pruned.items():
        loader = build_train_loader(
            root / "train",
            args.classes,
            batch_size=args.recover_batch_size,
            workers=args.workers,
            seed=args.seed,
        )  # a fresh loader per method: the same images in the same order for every method
        print(f"{method}: recovery ({args.recover_images} images / {args.recover_minutes} min) ...", flush=True)
        rec = recover(
            model,
            dense,
            loader,
            args.recover_images,
            args.recover_minutes,
            lr=args.recover_lr,
            masks=masks[method],
            seed=args.seed,
        )
        r = evaluate(model, batches, progress=False)
        after = zero_counts(model)
        results[method].update(
            recovery=rec,
            recovered={"top1": r["top1"], "top5": r["top5"], "loss": r["loss"]},
            sparsity_after=after,
            mask_held=mask_held(model, masks[method]),
            sparsity_exact_after_recovery=after["zeros"] == results[method]["sparsity_before"]["zeros"],
        )
        print(
            f"{method}: recovered top1 {r['top1']:.2f} after {rec['images_seen']} images / {rec['minutes']:.2f} min "
            f"(stopped by {rec['stopped_by']}); sparsity {after['sparsity']:.4f}, mask held "
            f"{results[method]['mask_held']}",
            flush=True,
        )
        if args.save_dir:
            from vitprune.models import save

            save(
                model,
                f"{args.save_dir}/{method}-s{args.sparsity:g}-recovered",
                overwrite=True,
                meta={args.name: results[method]},
            )

    load_end = loadavg()
    record = {
        "benchmark": "#5 top-1 at fixed sparsity after one fixed recovery budget (OBS vs global magnitude)",
        "model": args.model,
        "sparsity_target": args.sparsity,
        "methods": methods,
        "calibration": {"images": len(calib_idx), "source": str(root / "train"), "seed": args.seed},
        "val": {"images": dense_eval["n"], "stride": args.val_stride, "source": str(root / "val")},
        "dense": {
            "top1": dense_eval["top1"],
            "top5": dense_eval["top5"],
            "full_val_reference_top1": DENSE_TOP1_FULL_VAL,
        },
        "budget": {
            "images": args.recover_images,
            "minutes": args.recover_minutes,
            "batch_size": args.recover_batch_size,
            "lr": args.recover_lr,
        },
        "results": results,
        "obs_pass": obs_pass,
        "checks": {
            "sparsity_exact_after_recovery": all(r["sparsity_exact_after_recovery"] for r in results.values()),
            "masks_held": all(r["mask_held"] for r in results.values()),
            "obs_above_gm_recovered": (
                results["obs"]["recovered"]["top1"] > results["gm"]["recovered"]["top1"]
                if {"obs", "gm"} <= results.keys()
                else None
            ),
        },
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - t_start,
        "load_average": {"start": load_start, "end": load_end},
    }
    rows = [
        [
            m,
            f"{100 * results[m]['sparsity_after']['sparsity']:.2f} %",
            results[m]["oneshot"]["top1"],
            results[m]["recovered"]["top1"],
            results[m]["recovery"]["images_seen"],
            f"{results[m]['recovery']['minutes']:.1f}",
        ]
        for m in methods
    ]
    table = markdown_table(["method", "sparsity", "one-shot top-1 %", "recovered top-1 %", "images", "minutes"], rows)
    md = (
        f"# ViT-Tiny (Tiny-ImageNet-200) at {100 * args.sparsity:.0f} % unstructured sparsity after one fixed "
        "recovery budget\n\n"
        f"Budget: distillation from the dense model, at most {args.recover_images} training images or "
        f"{args.recover_minutes:g} minutes, whichever comes first (batch {args.recover_batch_size}, lr "
        f"{args.recover_lr:g}, pruned weights held at zero). Val subset: {dense_eval['n']} images (every "
        f"{args.val_stride}th); dense top-1 {dense_eval['top1']:.2f} % (full val reference {DENSE_TOP1_FULL_VAL} %). "
        f"Calibration: {len(calib_idx)} train images (seed {args.seed}).\n\n" + table + "\n"
    )
    if obs_pass:
        md += (
            f"\nOBS pass (Fisher from {obs_pass['num_grads']} per-sample gradients, block {obs_pass['block_size']}, "
            f"damp {obs_pass['damp']}{' relative' if obs_pass['damp_relative'] else ' absolute'}, "
            f"{obs_pass['criterion']} criterion): {obs_pass['wall_s']:.0f} s wall.\n"
        )
    md += (
        f"\nChecks: {record['checks']}\n\nTorch threads {record['threads']}; load average (1/5/15 min) at start "
        f"{load_start}, end {load_end} (the machine is shared; times are wall-clock).\n"
    )
    path = write_results(args.name, record, md)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
