"""NViT on the shared ViT-Tiny (Tiny-ImageNet-200): MACs and CPU-latency targets, one-shot and after recovery.

For every ``--macs`` target (and every ``--latency`` target, with a latency lookup table ``--lut`` built on this
CPU), :class:`vitprune.pruners.nvit.NViTPruner` prunes the dense model: ``--prune-steps`` removal rounds, each
after accumulating the Hessian-aware saliency ``I(S)`` over ``--batches-per-step`` training batches (eval
preprocessing, cross-entropy on the labels), ONE global ranking of heads / QK / V / MLP / embedding chunks, no
training between rounds, widths rounded to multiples of 8; then the physically smaller model is built. Its
top-1 is the one-shot figure. Targets listed in ``--recover`` are then distilled from the dense model with
:func:`_recovery.recover`, the budget every structural benchmark shares (``benchmarks/tp_baseline.py`` uses the
same function, defaults and loader), and evaluated again. Every model is saved under ``--save-dir`` so that
``benchmarks/structural_table.py`` can time them all side by side with the dense model on a quiet machine.

    python benchmarks/nvit_benchmark.py --macs 0.7 --recover 0.7 --val-limit-per-class 1 --prune-steps 2 \\
        --batches-per-step 1 --recover-images 64 --recover-minutes 1 --out-name nvit_smoke   # smoke
    python benchmarks/nvit_benchmark.py --macs 0.9 0.7 0.5 --recover 0.7 0.5 --recover-minutes 30 \\
        --threads 1 --val-limit-per-class 5 --save-dir runs/structural     # the benchmark
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import loadavg, markdown_table, shared_data, shared_model, write_results

from vitprune.errors import VitPruneError
from vitprune.models import save


def saliency_batches(batch_size: int, workers: int, seed: int) -> Iterator:
    """Endless shuffled training batches with eval preprocessing (labels from the model's classes.txt)."""
    from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader

    ds = ImageFolderDataset(shared_data() / "train", build_eval_transform("shared"), shared_model() / "classes.txt")
    epoch = 0
    while True:
        yield from make_loader(ds, batch_size, workers=workers, shuffle=True, seed=seed + epoch)
        epoch += 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--macs", type=float, nargs="*", default=[0.9, 0.7, 0.5], help="kept fractions of dense MACs")
    ap.add_argument("--latency", type=float, nargs="*", default=[], help="kept fractions of LUT latency")
    ap.add_argument("--lut", default=None, help="latency lookup table (vitprune lut build) for --latency targets")
    ap.add_argument("--recover", type=float, nargs="*", default=[], help="MACs targets to recover (default: none)")
    ap.add_argument("--recover-latency", action="store_true", help="also recover the latency-targeted models")
    ap.add_argument("--prune-steps", type=int, default=10)
    ap.add_argument("--batches-per-step", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="saliency batch size")
    ap.add_argument("--saliency-mode", choices=("labels", "distill"), default="labels")
    ap.add_argument("--criterion", choices=("saliency", "per_cost"), default="saliency")
    ap.add_argument("--round-to", type=int, default=8, help="0: off")
    ap.add_argument("--val-limit-per-class", type=int, default=None, help="first N val images per class")
    ap.add_argument("--recover-minutes", type=float, default=30.0)
    ap.add_argument("--recover-images", type=int, default=200_000, help="image budget of the recovery")
    ap.add_argument("--recover-batch-size", type=int, default=64)
    ap.add_argument("--recover-lr", type=float, default=None, help="default: _recovery.DEFAULTS['lr']")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="save every pruned / recovered model under this folder")
    ap.add_argument("--out-name", default="nvit_benchmark")
    args = ap.parse_args(argv)
    for t in [*args.macs, *args.latency]:
        if not 0.0 < t <= 1.0:
            ap.error(f"targets must be in (0, 1], got {t}")
    if args.latency and not args.lut:
        ap.error("--latency targets need --lut FILE (a table built by 'vitprune lut build' on this machine)")
    if args.lut and not Path(args.lut).is_file():
        ap.error(f"--lut: no such file: {args.lut}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import _structural_common as S
    from _recovery import DEFAULTS, build_train_loader, recover

    from vitprune import pruners
    from vitprune.latency.lut import LatencyTable

    t_start = time.perf_counter()
    load_start = loadavg()
    dense = S.load_dense()
    val = S.val_loader(args.val_limit_per_class, workers=args.workers)
    dense_eval = S.top1(dense, val)
    dense_info = S.describe(dense, None)
    print(f"dense: top-1 {dense_eval['top1']:.2f} on {dense_eval['n']} val images", flush=True)
    lut = LatencyTable.load(args.lut) if args.lut else None
    targets = [("macs", t) for t in args.macs] + [("latency", t) for t in args.latency]
    to_recover = {("macs", t) for t in args.recover} | {("latency", t) for t in args.latency if args.recover_latency}
    train_loader = None
    if to_recover:
        train_loader = build_train_loader(batch_size=args.recover_batch_size, workers=args.workers, seed=args.seed)
    lr = args.recover_lr or DEFAULTS["lr"]

    rows: list[dict[str, Any]] = []
    for metric, target in targets:
        name = f"nvit-{metric}-{target:g}"
        t0 = time.perf_counter()
        kwargs = {f"target_{metric}": target}
        pruner = pruners.create(
            "nvit",
            **kwargs,
            lut=lut if metric == "latency" else None,  # a MACs target is ranked without latency regularisation
            prune_steps=args.prune_steps,
            batches_per_step=args.batches_per_step,
            saliency_mode=args.saliency_mode,
            criterion=args.criterion,
            reconstruct="off",  # as recorded (the paper's; vitprune's default re-solves proj / fc2)
            round_to=args.round_to or None,
            finetune_steps=0,
            seed=args.seed,
            progress=False,
        )
        res = pruner.prune(dense, saliency_batches(args.batch_size, args.workers, args.seed))
        model, report = res.model, res.report
        model.eval()
        row: dict[str, Any] = {
            "name": name,
            "metric": metric,
            "target": target,
            **S.describe(model, dense_info["macs"]),
            "prune_s": time.perf_counter() - t0,
            "saliency_images_per_step": args.batches_per_step * args.batch_size,
            "rounds": [
                {k: r.get(k) for k in ("step", "target_fraction", "macs_fraction", "removed_units", "time_s")}
                for r in report["history"]
            ],
            "eta": report.get("eta"),
        }
        if lut is not None and metric == "latency":
            row["lut_pred_ms"] = lut.predict(model.config)
            row["lut_pred_fraction"] = row["lut_pred_ms"] / lut.predict(dense.config)
        row["oneshot"] = S.top1(model, val)
        print(f"{name}: MACs {row['macs_fraction']:.3f}, one-shot top-1 {row['oneshot']['top1']:.2f}", flush=True)
        if args.save_dir:
            save(model, f"{args.save_dir}/{name}", overwrite=True, meta={"nvit_benchmark": row})
        if (metric, target) in to_recover:
            row["recovery"] = recover(
                model, dense, train_loader, args.recover_images, args.recover_minutes, lr=lr, seed=args.seed
            )
            row["recovered"] = S.top1(model, val)
            rec = row["recovery"]
            msg = f"recovered top-1 {row['recovered']['top1']:.2f} after {rec['images_seen']} images"
            print(f"{name}: {msg} / {rec['minutes']:.1f} min", flush=True)
            if args.save_dir:
                save(model, f"{args.save_dir}/{name}-recovered", overwrite=True, meta={"nvit_benchmark": row})
        rows.append(row)

    record = {
        "benchmark": "NViT (vitprune) on the shared ViT-Tiny",
        "settings": {
            k: getattr(args, k)
            for k in (
                "prune_steps",
                "batches_per_step",
                "batch_size",
                "saliency_mode",
                "criterion",
                "round_to",
                "val_limit_per_class",
                "recover_minutes",
                "recover_images",
                "recover_batch_size",
                "lut",
                "threads",
                "seed",
            )
        },
        "recover_lr": lr,
        "dense": {**dense_info, "top1": dense_eval["top1"], "eval": dense_eval},
        "results": rows,
        "wall_s": time.perf_counter() - t_start,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    table_rows = [["dense", "-", "1.000", dense_info["params"], dense_eval["top1"], "-", "-", "-"]]
    for r in rows:
        rec = r.get("recovery") or {}
        table_rows.append(
            [
                r["metric"],
                f"{r['target']:g}",
                f"{r['macs_fraction']:.3f}",
                r["params"],
                r["oneshot"]["top1"],
                r.get("recovered", {}).get("top1", "-"),
                rec.get("images_seen", "-"),
                f"{rec['minutes']:.1f}" if rec else "-",
            ]
        )
    headers = ["target", "fraction", "MACs fraction", "params", "one-shot top-1 %", "recovered top-1 %"]
    table = markdown_table([*headers, "recovery images", "recovery min"], table_rows)
    md = (
        "# NViT on the shared ViT-Tiny (Tiny-ImageNet-200)\n\n"
        f"{table}\n\n"
        f"- val images: {dense_eval['n']}"
        + (f" (first {args.val_limit_per_class} per class)" if args.val_limit_per_class else "")
        + f"; {args.prune_steps} removal rounds, saliency from {args.batches_per_step} x {args.batch_size} training"
        f" images per round ({args.saliency_mode}), criterion {args.criterion}, widths rounded to {args.round_to}\n"
        f"- recovery: distillation from the dense model, at most {args.recover_images} images or"
        f" {args.recover_minutes:g} min per model (batch {args.recover_batch_size}, lr {lr:g}; see the JSON)\n"
        "- speed: `benchmarks/structural_table.py` times the saved models side by side with the dense one\n"
    )
    path = write_results(args.out_name, record, md)
    print(f"-> {path} ({record['wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
