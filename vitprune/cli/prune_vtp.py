"""``vitprune prune vtp``: VTP (learned dimension gates + L1 sparsity), thin over :class:`VTPPruner`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from vitprune.errors import VitPruneError


def _gates(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'LO,HI', got {text!r}") from None
    return lo, hi


def cmd_vtp(args: argparse.Namespace) -> int:
    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.data.transforms import eval_transform_for
    from vitprune.metrics.evaluate import evaluate
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.vtp import VTPPruner
    from vitprune.training import distributed as D
    from vitprune.training.augment import build_train_transform
    from vitprune.training.runinfo import command_line, loadavg, machine_info, utc_now
    from vitprune.utils.device import resolve_device

    t0 = time.perf_counter()
    if args.threads is not None:
        if args.threads <= 0:
            raise VitPruneError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.batch_size <= 0:
        raise VitPruneError(f"--batch-size must be positive, got {args.batch_size}")
    # every setting is checked here, before any data is read or anything is trained or written
    pruner = VTPPruner(
        target_macs=args.target_macs,
        target_params=args.target_params,
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        lam=args.lam,
        gates=args.gates,
        sparsity_steps=args.sparsity_steps,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        gate_lr=args.gate_lr if args.gate_lr > 0 else None,
        finetune_lr=args.finetune_lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        amp=args.amp,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        label_smoothing=args.label_smoothing,
        round_to=args.round_to if args.round_to > 0 else None,
        img_size=args.img_size,
        seed=args.seed,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        progress=not args.no_progress,
    )
    model = load_model(args.model, preset=args.arch_preset)
    pruner.check(model)
    teacher = load_model(args.teacher, preset=args.arch_preset) if args.teacher else None
    if teacher is not None and teacher.config.num_classes != model.config.num_classes:
        raise VitPruneError(
            f"teacher has {teacher.config.num_classes} classes but the model has {model.config.num_classes}"
        )
    device = D.setup_distributed(resolve_device(args.device))
    pruner.device = device
    if args.batch_size % D.world_size():
        raise VitPruneError(f"--batch-size {args.batch_size} must be a multiple of the {D.world_size()} processes")
    img_size = args.img_size or (model.config.preprocess or {}).get("img_size") or model.config.img_size
    ev = eval_transform_for(model.config.preprocess, default=args.preset, img_size=img_size)
    interp = ev.interpolation if ev.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    train_tf = build_train_transform(
        ev.img_size, ev.mean, ev.std, scale=args.crop_scale, hflip=args.hflip, randaugment="none", interpolation=interp
    )
    train_set = ImageFolderDataset(args.data, train_tf, args.classes, args.limit_per_class)
    if train_set.num_classes > model.config.num_classes:
        raise VitPruneError(f"{args.data} has {train_set.num_classes} classes, the model {model.config.num_classes}")
    loader = make_loader(
        train_set,
        args.batch_size // D.world_size(),
        workers=args.workers,
        shuffle=True,
        distributed=D.is_distributed(),
        drop_last=True,
        seed=args.seed,
    )
    eval_fn = None
    if args.val:
        val_set = ImageFolderDataset(args.val, ev, args.classes, args.val_limit_per_class)
        val_loader = make_loader(val_set, args.eval_batch_size, workers=args.workers, distributed=D.is_distributed())
        eval_fn = lambda m: evaluate(m, val_loader, device=device, progress=False)  # noqa: E731
    load_start = loadavg()
    _, report = pruner.prune(model, loader, teacher=teacher, eval_fn=eval_fn)
    report["run"] = {
        "command": command_line(),
        "model": str(args.model),
        "data": str(args.data),
        "val": str(args.val) if args.val else None,
        "machine": machine_info(),
        "world_size": D.world_size(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "date": utc_now(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if D.rank() == 0:
        from vitprune.reports import write_json_report

        write_json_report(pruner.out_dir / "report.json", report)
        _print_summary(report, args.out)
    D.barrier()
    return 0


def _print_summary(report: dict[str, Any], out: str) -> None:
    sel, pruned = report["selection"], report["pruned"]
    msg = (
        f"VTP: kept {pruned['fraction']['macs']:.3f} of dense MACs, {pruned['fraction']['params']:.3f} of params "
        f"(target {sel['metric']} {sel['target_fraction']:g}); removed {sel['removed']} of {sel['candidates']} "
        f"gated units at |a| <= {sel['threshold']}"
    )
    if "eval" in pruned:
        dense = report["dense"].get("eval", {})
        msg += f"; top-1 {dense.get('top1', float('nan')):.2f} % -> {pruned['eval']['top1']:.2f} %"
    print(msg)
    print(f"model: {out}/model  report: {out}/report.json")
    if report.get("fold_check"):
        print(json.dumps({"fold_check": report["fold_check"]}))


def register_prune(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser(
        "vtp",
        help="VTP: learned dimension gates with L1 sparsity, one global threshold, fine-tuning",
        description="Vision Transformer Pruning (Zhu et al. 2021): attach gates (init 1) to QK dims, V dims and MLP "
        "neurons (optionally heads and embedding channels), train with loss + lambda * sum|gate| (distillation "
        "from the dense model), remove the units below ONE global |gate| threshold chosen to meet the target, fold "
        "the kept gates into the weights, build the smaller model and fine-tune it with distillation.",
    )
    p.add_argument("model", help="model to prune (vitprune dir, timm .pth/.safetensors, Hugging Face dir)")
    p.add_argument("--data", required=True, help="training images: DIR/<class>/<image>")
    p.add_argument("--classes", default=None, help="file whose line i names output i")
    p.add_argument("--val", default=None, help="validation images: dense, pruned and final top-1 in the report")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-macs", type=float, default=None, help="keep this fraction of the dense MACs, in (0, 1]")
    t.add_argument("--target-params", type=float, default=None, help="keep this fraction of the parameters")
    v = p.add_argument_group("VTP")
    v.add_argument("--lambda", dest="lam", type=float, default=1e-4, help="L1 weight on the gates (default 1e-4)")
    v.add_argument("--gates", type=_gates, default=("qk", "v", "mlp"), help="qk,v,mlp (default) plus heads, emb")
    v.add_argument("--sparsity-steps", type=int, default=1000, help="steps of L1 sparsity training")
    v.add_argument("--finetune-steps", type=int, default=1000, help="steps of fine-tuning after surgery (0: none)")
    v.add_argument("--lr", type=float, default=1e-4, help="learning rate of the weights in sparsity training")
    v.add_argument("--gate-lr", type=float, default=1e-2, help="extra AdamW step on the gates; 0: none (paper)")
    v.add_argument("--finetune-lr", type=float, default=1e-4)
    v.add_argument("--round-to", type=int, default=8, help="round kept QK/V/MLP/emb widths up to a multiple (0: off)")
    tr = p.add_argument_group("training")
    tr.add_argument("--batch-size", type=int, default=64, help="global batch size")
    tr.add_argument("--min-lr", type=float, default=1e-6)
    tr.add_argument("--weight-decay", type=float, default=0.05)
    tr.add_argument("--warmup-steps", type=int, default=0)
    tr.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    tr.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    tr.add_argument("--teacher", default=None, help="teacher for distillation (default: the dense model)")
    tr.add_argument("--distill-alpha", type=float, default=1.0, help="1: distillation only (no labels used)")
    tr.add_argument("--distill-temperature", type=float, default=1.0)
    tr.add_argument("--label-smoothing", type=float, default=0.0)
    tr.add_argument("--crop-scale", type=_pair, default=(0.35, 1.0), help="RandomResizedCrop area range LO,HI")
    tr.add_argument("--hflip", type=float, default=0.5)
    tr.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("data and run")
    d.add_argument("--preset", default="shared", help="preprocessing preset when the model records none")
    d.add_argument("--arch-preset", default=None, help="architecture preset for bare timm weights")
    d.add_argument("--img-size", type=int, default=None)
    d.add_argument("--limit-per-class", type=int, default=None, help="use the first N training images per class")
    d.add_argument("--val-limit-per-class", type=int, default=None)
    d.add_argument("--eval-batch-size", type=int, default=64)
    d.add_argument("--out", required=True, help="run directory: model/, report.json, dims.png, checkpoints")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    d.add_argument("--ckpt-every", type=int, default=200, help="checkpoint every N steps (and at each phase's end)")
    d.add_argument("--log-every", type=int, default=50)
    d.add_argument("--workers", type=int, default=0)
    d.add_argument("--device", default="auto", help="cpu, cuda or auto")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_vtp)
