"""VTP on the shared ViT-Tiny (Tiny-ImageNet-200): structured pruning to 70 % and 50 % of the dense MACs.

For each target: learnable gates on QK dims, V dims and MLP neurons (init 1), sparsity training
``KD(dense teacher) + lambda * sum|a|``, ONE global |a| threshold meeting the MACs target, fold + surgery, then
fine-tuning with distillation. Recorded per target: the achieved MACs / parameter fractions, top-1 on a fixed val
subset (dense, right after surgery, after fine-tuning), the per-block dims, a measured CPU latency ratio
(dense / pruned, alternating runs) and, as a control, a *uniform magnitude* pruning of the same MACs (the same
fraction of QK / V / MLP units in every block, lowest weight-norm first, no training) right after surgery.

The training budget is a parameter: ``--train-images`` (images seen per target, split between the two phases by
``--sparsity-share``) and ``--minutes`` (per target; the step count is cut to fit, from a measured step time).

    python benchmarks/vtp_prune.py                                        # default budget (about an hour here)
    python benchmarks/vtp_prune.py --train-images 640 --minutes 3 --val-per-class 2 --name vtp_prune_smoke
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import cached_batches, markdown_table, shared_data, shared_model, write_results

from vitprune import pruners
from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics import evaluate
from vitprune.metrics.flops import count_macs, count_params
from vitprune.metrics.latency import compare_latency
from vitprune.models.checkpoints import load_model
from vitprune.training.augment import build_train_transform
from vitprune.training.losses import DistillationLoss


def measure_step_s(model, batch: torch.Tensor, steps: int = 2) -> float:
    """Seconds of one sparsity/fine-tuning step (student forward + backward, teacher forward) at this batch."""
    student = copy.deepcopy(model).train()
    loss_fn = DistillationLoss(alpha=1.0)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            t_out = model(batch)
        loss_fn(student(batch), None, t_out).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def uniform_magnitude(model, target: float, round_to: int | None, loader):
    """The structural L2 baseline of the registry at ``target`` of the MACs (same kept fraction in every block)."""
    return (
        pruners.create("l2", target_macs=target, round_to=round_to or None, progress=False).prune(model, loader).model
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--data", default=str(shared_data()))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5], help="kept fractions of dense MACs")
    ap.add_argument("--train-images", type=int, default=20000, help="training images per target (both phases)")
    ap.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget per target")
    ap.add_argument("--sparsity-share", type=float, default=0.5, help="share of the steps for sparsity training")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-4)
    ap.add_argument("--gates", default="qk,v,mlp")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gate-lr", type=float, default=1e-2, help="0: gates through the Trainer's AdamW only")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--round-to", type=int, default=8, help="round kept widths up to a multiple (0: off)")
    ap.add_argument("--train-per-class", type=int, default=100, help="training images per class (<= 100)")
    ap.add_argument("--val-per-class", type=int, default=25, help="val images per class (25 = all 5,000)")
    ap.add_argument("--latency-batch", type=int, default=16)
    ap.add_argument("--latency-runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="vtp_prune")
    ap.add_argument("--save-dir", default=None, help="save each fine-tuned model under this folder")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data)
    model = load_model(args.model).eval()
    dense_macs, dense_params = count_macs(model.config)["total"], count_params(model.config)
    ev = build_eval_transform("shared")
    train_tf = build_train_transform(224, mean=ev.mean, std=ev.std, scale=(0.35, 1.0), hflip=0.5, randaugment="none")
    train = ImageFolderDataset(root / "train", train_tf, args.classes, limit_per_class=args.train_per_class)
    loader = make_loader(train, args.batch_size, shuffle=True, drop_last=True, seed=args.seed)
    val = ImageFolderDataset(root / "val", ev, args.classes, limit_per_class=args.val_per_class)
    t0 = time.perf_counter()
    batches = cached_batches(val, 50)
    print(f"val: {len(val)} images decoded in {time.perf_counter() - t0:.0f} s", flush=True)

    def eval_fn(m):
        r = evaluate(m, batches, progress=False)
        return {k: r[k] for k in ("top1", "top5", "loss", "n")}

    dense_eval = eval_fn(model)
    print(f"dense: top-1 {dense_eval['top1']:.2f} % on {dense_eval['n']}", flush=True)
    probe = torch.stack([train[i][0] for i in range(args.batch_size)])
    step_s = measure_step_s(model, probe)
    by_images = max(2, args.train_images // args.batch_size)
    by_time = max(2, int(args.minutes * 60 / step_s))
    steps = min(by_images, by_time)
    sparsity_steps = max(1, round(steps * args.sparsity_share))
    finetune_steps = max(0, steps - sparsity_steps)
    budget = {
        "train_images": args.train_images,
        "minutes": args.minutes,
        "measured_step_s": round(step_s, 3),
        "steps": steps,
        "limited_by": "minutes" if by_time < by_images else "images",
        "sparsity_steps": sparsity_steps,
        "finetune_steps": finetune_steps,
        "images_seen": steps * args.batch_size,
    }
    print(f"budget: {budget}", flush=True)

    results = []
    for target in args.targets:
        with tempfile.TemporaryDirectory(prefix="vtp_bench_") as tmp:
            pruner = pruners.create(
                "vtp",
                target_macs=target,
                lam=args.lam,
                kinds=tuple(args.gates.split(",")),
                sparsity_steps=sparsity_steps,
                finetune_steps=finetune_steps,
                lr=args.lr,
                gate_lr=args.gate_lr if args.gate_lr > 0 else None,
                finetune_lr=args.finetune_lr,
                round_to=args.round_to if args.round_to > 0 else None,
                grad_clip=1.0,
                seed=args.seed,
                log_every=max(1, sparsity_steps // 10),
            )
            t_run = time.perf_counter()
            res = pruner.prune(model, loader, eval_fn=eval_fn, workdir=Path(tmp) / "run")
            small, report = res.model, res.report
            wall = time.perf_counter() - t_run
        uniform = uniform_magnitude(model, target, args.round_to, loader)
        uni_eval = eval_fn(uniform)
        lat = compare_latency(model, small, batch_size=args.latency_batch, runs=args.latency_runs, warmup=2)
        row = {
            "target_macs": target,
            "macs_fraction": report["pruned"]["fraction"]["macs"],
            "params_fraction": report["pruned"]["fraction"]["params"],
            "top1_dense": dense_eval["top1"],
            "top1_after_surgery": report["pruned_before_finetune_eval"]["top1"],
            "top1_final": report["pruned"]["eval"]["top1"],
            "top1_uniform_magnitude_no_training": uni_eval["top1"],
            "uniform_macs_fraction": count_macs(uniform.config)["total"] / dense_macs,
            "latency_ratio_dense_over_pruned": lat["ratio"],
            "latency": {k: lat[k] for k in ("ratio", "ratio_p10", "ratio_p90", "batch_size", "threads")},
            "latency_ms": {"dense": lat["a"]["median_ms"], "pruned": lat["b"]["median_ms"]},
            "wall_s": round(wall, 1),
            "fold_check": report.get("fold_check"),
            "selection": report["selection"],
            "pruned_blocks": report["pruned"]["blocks"],
            "gate_log": report.get("gate_log"),
            "sparsity": report.get("sparsity"),
            "finetune": report.get("finetune"),
        }
        if args.save_dir:
            from vitprune.models import save

            save(small, f"{args.save_dir}/vtp-macs-{target:g}-recovered", overwrite=True, meta={"vtp_prune": row})
        results.append(row)
        print(
            f"target {target:.2f}: MACs {row['macs_fraction']:.3f}, params {row['params_fraction']:.3f}, top-1 "
            f"{row['top1_dense']:.2f} -> {row['top1_after_surgery']:.2f} (surgery) -> {row['top1_final']:.2f} "
            f"(fine-tuned); uniform magnitude {row['top1_uniform_magnitude_no_training']:.2f}; "
            f"latency x{row['latency_ratio_dense_over_pruned']:.2f}; {wall:.0f} s",
            flush=True,
        )

    headers = [
        "target MACs",
        "MACs",
        "params",
        "top-1 dense",
        "top-1 after surgery",
        "top-1 fine-tuned",
        "uniform magnitude (no training)",
        "CPU speed-up",
    ]
    rows = [
        [
            f"{100 * r['target_macs']:.0f} %",
            f"{100 * r['macs_fraction']:.1f} %",
            f"{100 * r['params_fraction']:.1f} %",
            r["top1_dense"],
            r["top1_after_surgery"],
            r["top1_final"],
            r["top1_uniform_magnitude_no_training"],
            f"{r['latency_ratio_dense_over_pruned']:.2f}x",
        ]
        for r in results
    ]
    dims = "\n".join(
        f"- {100 * r['target_macs']:.0f} %: MLP per block "
        + ", ".join(str(b["mlp_dim"]) for b in r["pruned_blocks"])
        + "; QK/V per head "
        + ", ".join(f"{b['qk_dim']}/{b['v_dim']}" for b in r["pruned_blocks"])
        for r in results
    )
    md = (
        "# VTP on ViT-Tiny / Tiny-ImageNet-200\n\n"
        f"Dense: {dense_macs / 1e9:.3f} GMACs, {dense_params / 1e6:.2f} M params. Val subset: {dense_eval['n']} "
        f"images ({args.val_per_class} per class). Budget per target: {budget['images_seen']} training images "
        f"({budget['sparsity_steps']} sparsity + {budget['finetune_steps']} fine-tuning steps of {args.batch_size}), "
        f"limited by {budget['limited_by']} (measured step {budget['measured_step_s']} s); lambda {args.lam:g}, "
        f"gate lr {args.gate_lr:g}, lr {args.lr:g}, gates {args.gates}, widths rounded to {args.round_to or 1}.\n\n"
        + markdown_table(headers, rows)
        + "\n\nPer-block widths after pruning:\n"
        + dims
        + "\n"
    )
    record = {"args": vars(args), "dense": {"macs": dense_macs, "params": dense_params, "eval": dense_eval}}
    record |= {"budget": budget, "results": results}
    path = write_results(args.name, record, md)
    print(md)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
