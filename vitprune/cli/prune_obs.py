"""``vitprune prune obs``: oViT/OBS unstructured pruning (one-shot sweep, N:M, gradual) and the baselines.

One-shot output (``--out DIR``, written atomically as a whole)::

    DIR/report.json                 settings, timings, peak memory, per-layer sparsity, top-1 with --val
    DIR/s0.50/model/                pruned model (vitprune directory; zeros stored dense)
    DIR/s0.50/masks.safetensors     keep-masks (uint8) by parameter name, for sparse fine-tuning
    DIR/s0.50/sparse/               with --compressed: bitmask + values storage (vitprune.export.sparse)

Gradual (``--gradual``): ``DIR`` is a resumable run directory (see :meth:`OBSPruner.gradual`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from vitprune.errors import VitPruneError
from vitprune.recipes import add_recipe_option

CLASSES_FILE = "classes.txt"


def _classes_file(model_path: str, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    p = Path(model_path)
    candidate = (p if p.is_dir() else p.parent) / CLASSES_FILE
    return str(candidate) if candidate.is_file() else None


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {v}")
    return v


def cmd_obs(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.data.transforms import eval_transform_for
    from vitprune.metrics.evaluate import evaluate
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.calibration import parse_nm
    from vitprune.pruners.obs import METHODS, OBSConfig, peak_rss_bytes, prune_unstructured
    from vitprune.training.runinfo import command_line, loadavg, machine_info, utc_now
    from vitprune.utils.fs import check_writable_target

    t_start = time.perf_counter()
    if args.threads is not None:
        if args.threads <= 0:
            raise VitPruneError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.method not in METHODS:
        raise VitPruneError(f"unknown --method {args.method!r} (choose from {', '.join(METHODS)})")
    nm = parse_nm(args.nm)
    if args.gradual:
        if args.method != "obs" or nm is not None:
            raise VitPruneError("--gradual is for unstructured OBS (--method obs without --nm)")
        schedule = args.schedule or args.sparsity
        if not schedule:
            raise VitPruneError("--gradual needs --schedule (or --sparsity) levels, e.g. 0.5 0.6 0.75 0.9")
        out = check_writable_target(args.out, overwrite=True)  # parent writable; existing handled below
        if out.exists() and not (args.resume or args.overwrite):
            raise VitPruneError(f"output exists: {out} (use --resume to continue it or --overwrite to replace it)")
        if out.exists() and args.overwrite and not args.resume:
            import shutil

            check_writable_target(out, overwrite=True)
            shutil.rmtree(out)
    else:
        if nm is None and not args.sparsity:
            raise VitPruneError("give --sparsity (one or more targets) or --nm")
        check_writable_target(args.out, overwrite=args.overwrite)
    for name in ("num_grads", "block_size", "batch_size"):
        if getattr(args, name) <= 0:
            raise VitPruneError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    damp = args.damp if args.damp is not None else (0.01 if args.method == "sparsegpt" else OBSConfig.damp)
    if args.damp_absolute and args.damp is None:
        raise VitPruneError("--damp-absolute needs an explicit --damp (the paper used 1e-8)")
    obs_cfg = None
    if args.method == "obs":
        obs_cfg = OBSConfig(
            block_size=args.block_size,
            num_grads=args.num_grads,
            grad_mode=args.grad_mode,
            damp=damp,
            damp_relative=not args.damp_absolute,
            fisher_labels=args.fisher_labels,
            fisher_mode=args.fisher_mode,
            allocation=args.allocation,
            criterion=args.criterion,
            nm=nm,
            max_memory_gb=args.max_memory_gb if args.max_memory_gb > 0 else None,
            allow_smaller_blocks=args.auto_block_size,
            device=args.device,
            seed=args.seed,
        )
        obs_cfg.validate()

    model = load_model(args.model, preset=args.arch_preset)
    classes = _classes_file(args.model, args.classes)
    transform = eval_transform_for(model.config.preprocess, default=args.preset, img_size=model.config.img_size)
    data = ImageFolderDataset(args.data, transform, classes)
    if data.num_classes > model.config.num_classes:
        raise VitPruneError(f"{args.data} has {data.num_classes} classes but the model has {model.config.num_classes}")
    n_calib = min(args.calib_images or args.num_grads, len(data))
    g = torch.Generator().manual_seed(args.seed)
    calib = Subset(data, torch.randperm(len(data), generator=g)[:n_calib].tolist())
    calib_loader = make_loader(calib, args.batch_size, workers=args.workers)
    val_loader = None
    if args.val:
        val = ImageFolderDataset(args.val, transform, classes, args.val_limit_per_class)
        val_loader = make_loader(val, 64, workers=args.workers)

    def score(m: torch.nn.Module) -> dict[str, Any]:
        return evaluate(m, val_loader, device=args.device, progress=False)

    load_start = loadavg()
    run = {"command": command_line(), "model": args.model, "data": args.data, "calibration_images": n_calib}
    if args.gradual:
        return _gradual(args, model, obs_cfg, calib_loader, classes, transform, score if val_loader else None, run)

    kwargs: dict[str, Any] = {}
    if args.method != "obs":
        kwargs = {"nm": nm, "num_samples": n_calib, "device": args.device}
        if args.method == "sparsegpt":
            kwargs.update(damp=damp, blocksize=args.block_size)
    results = prune_unstructured(model, args.method, args.sparsity or [], calib_loader, obs_cfg, **kwargs)
    report: dict[str, Any] = {"method": args.method, "nm": args.nm, "targets": {}}
    if val_loader is not None:
        report["dense_eval"] = score(model)
    from safetensors.torch import save_file

    from vitprune.export.sparse import save_sparse
    from vitprune.models.io import save
    from vitprune.utils.fs import atomic_path

    with atomic_path(args.out, overwrite=args.overwrite, is_dir=True) as tmp:
        for target, res in results.items():
            sub = tmp / f"s{target:.2f}"
            sub.mkdir()
            save(res.model, sub / "model", meta={"prune": {"method": args.method, "target": target}})
            save_file({k: v.to(torch.uint8).contiguous() for k, v in res.masks.items()}, str(sub / "masks.safetensors"))
            entry = dict(res.report)
            if args.compressed:
                info = save_sparse(res.model, sub / "sparse")
                entry["compressed"] = {k: v for k, v in info.items() if k != "compressed_tensors"}
                entry["compressed"]["path"] = str(Path(args.out) / sub.name / "sparse")
            if val_loader is not None:
                entry["eval"] = score(res.model)
            report["targets"][f"{target:.2f}"] = entry
        run.update(
            machine=machine_info(),
            date=utc_now(),
            wall_s=round(time.perf_counter() - t_start, 1),
            peak_rss_bytes=peak_rss_bytes(),
            loadavg_start=load_start,
            loadavg_end=loadavg(),
        )
        report["run"] = run
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for key, entry in report["targets"].items():
        line = f"{args.method} s={key}: sparsity {entry['sparsity']:.4f}"
        if "eval" in entry:
            line += f", top-1 {entry['eval']['top1']:.2f} %"
        if "compressed" in entry:
            line += f", compressed {entry['compressed']['file_bytes'] / 2**20:.2f} MiB"
        print(line)
    if "dense_eval" in report:
        print(f"dense top-1 {report['dense_eval']['top1']:.2f} %")
    print(f"models and report: {args.out}")
    return 0


def _gradual(args, model, obs_cfg, calib_loader, classes, transform, score, run) -> int:
    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.pruners.obs import OBSPruner
    from vitprune.training.augment import build_train_transform
    from vitprune.training.engine import TrainConfig

    train_cfg = TrainConfig(
        steps=args.steps_per_level,
        batch_size=args.train_batch_size,
        lr=args.lr,
        min_lr=min(args.min_lr, args.lr),
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        distill_alpha=args.distill_alpha,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        progress=not args.no_progress,
    )
    interp = transform.interpolation if transform.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    train_tf = build_train_transform(
        transform.img_size, transform.mean, transform.std, scale=(0.35, 1.0), randaugment="none", interpolation=interp
    )
    train_set = ImageFolderDataset(args.train_data or args.data, train_tf, classes)
    train_loader = make_loader(train_set, args.train_batch_size, workers=args.workers, shuffle=True, drop_last=True)
    teacher = None
    if args.distill_alpha > 0:
        import copy

        teacher = copy.deepcopy(model).eval()
    pruner = OBSPruner(model, obs_cfg)
    result = pruner.gradual(
        calib_loader,
        train_loader,
        args.schedule or args.sparsity,
        train_cfg,
        args.out,
        teacher=teacher,
        eval_fn=(lambda m: score(m)["top1"]) if score else None,
        eval_every=args.eval_every,
        device=args.device,
    )
    for level in result["report"]["levels"]:
        best = f", best top-1 {level['best_score']:.2f} % (step {level['best_step']})" if level["best_score"] else ""
        print(f"level {level['level']}: sparsity {level['obs']['sparsity']:.4f}{best}")
    print(f"run directory: {args.out}")
    return 0


def register_prune(methods: argparse._SubParsersAction) -> None:
    from vitprune.pruners.obs import OBSConfig

    p = methods.add_parser(
        "obs",
        help="oViT/OBS second-order unstructured pruning (and GM/UM/Wanda/SparseGPT baselines)",
        description="Correlation-aware Optimal Brain Surgeon pruning (oViT/CAP): block-diagonal empirical Fisher "
        "inverse, greedy per-block removal with OBS updates, one global threshold on the loss traces. One pass "
        "builds models for every --sparsity target. --method picks a baseline instead.",
    )
    p.add_argument("model", help="model to prune (vitprune dir, timm .pth/.safetensors, Hugging Face dir)")
    p.add_argument("--data", required=True, help="calibration images: DIR/<class>/<image>")
    p.add_argument("--classes", default=None, help="file whose line i names output i (default: classes.txt by MODEL)")
    p.add_argument("--val", default=None, help="validation images: top-1 of the dense and pruned models in the report")
    p.add_argument("--val-limit-per-class", type=int, default=None)
    p.add_argument("--sparsity", type=_fraction, nargs="+", default=None, help="target sparsities, e.g. 0.5 0.6 0.7")
    p.add_argument("--method", default="obs", help="obs (default), gm, um, wanda or sparsegpt")
    p.add_argument("--nm", default=None, metavar="N:M", help="semi-structured: keep N of every M inputs (e.g. 2:4)")
    o = p.add_argument_group("OBS")
    o.add_argument("--block-size", type=int, default=128, help="Fisher block size B (SparseGPT: column block)")
    o.add_argument("--num-grads", type=int, default=1024, help="gradients m in the Fisher (= calibration images)")
    o.add_argument(
        "--damp",
        type=float,
        default=None,
        help=f"Fisher lambda as a fraction of the layer's mean Fisher diagonal (OBS, default {OBSConfig.damp}); "
        "SparseGPT: fraction of mean diag(X^T X) (default 0.01)",
    )
    o.add_argument("--damp-absolute", action="store_true", help="--damp is an absolute lambda (paper: 1e-8)")
    o.add_argument(
        "--fisher-labels",
        choices=("data", "model"),
        default="data",
        help="gradient labels: the data's (empirical Fisher) or sampled from the model (true Fisher)",
    )
    o.add_argument("--grad-mode", choices=("per_sample", "batch"), default="per_sample")
    o.add_argument("--fisher-mode", choices=("accumulate", "woodbury"), default="accumulate")
    o.add_argument("--allocation", choices=("global", "layer"), default="global", help="sparsity over all layers")
    o.add_argument(
        "--criterion",
        choices=("cumulative", "marginal"),
        default=OBSConfig.criterion,
        help="threshold on each block's cumulative OBS loss (paper) or on the cost per removal",
    )
    o.add_argument("--max-memory-gb", type=float, default=8.0, help="refuse a bigger Fisher inverse (0: no limit)")
    o.add_argument("--auto-block-size", action="store_true", help="shrink B to fit --max-memory-gb instead of failing")
    o.add_argument("--calib-images", type=int, default=None, help="calibration images (default: --num-grads)")
    o.add_argument("--batch-size", type=int, default=16, help="calibration batch size")
    gr = p.add_argument_group("gradual")
    gr.add_argument("--gradual", action="store_true", help="OBS step + masked recovery training per level")
    gr.add_argument("--schedule", type=_fraction, nargs="+", default=None, help="levels, e.g. 0.5 0.6 0.75 0.9")
    gr.add_argument("--train-data", default=None, help="recovery training images (default: --data)")
    gr.add_argument("--steps-per-level", type=int, default=500)
    gr.add_argument("--train-batch-size", type=int, default=64)
    gr.add_argument("--lr", type=float, default=1e-4, help="restarted at each level (cosine decay)")
    gr.add_argument("--min-lr", type=float, default=1e-6)
    gr.add_argument("--weight-decay", type=float, default=0.05)
    gr.add_argument("--warmup-steps", type=int, default=0)
    gr.add_argument("--grad-clip", type=float, default=1.0)
    gr.add_argument("--distill-alpha", type=float, default=1.0, help="distillation from the dense model (0: labels)")
    gr.add_argument("--eval-every", type=int, default=0, help="score --val every N steps to keep the best")
    gr.add_argument("--ckpt-every", type=int, default=100)
    gr.add_argument("--resume", action="store_true", help="continue the gradual run in --out")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--compressed", action="store_true", help="also store each model as bitmask + values")
    r.add_argument("--preset", default="shared", help="preprocessing preset when the model records none")
    r.add_argument("--arch-preset", default=None, help="architecture preset for bare timm weights")
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--seed", type=int, default=0, help="calibration subset and training order")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_obs)
    add_recipe_option(p, "obs")
