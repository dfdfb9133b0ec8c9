"""``vitprune prune nvit``: NViT global structural pruning with Hessian-aware saliency, thin over NViTPruner."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from vitprune.errors import VitPruneError


def _chunks(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=SIZE,..., got {text!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KIND=SIZE,..., got {text!r}")
    return out


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def cmd_nvit(args: argparse.Namespace) -> int:
    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.data.transforms import eval_transform_for
    from vitprune.latency.lut import LatencyTable
    from vitprune.metrics.evaluate import evaluate
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.nvit import NViTPruner
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
    lut = LatencyTable.load(args.lut) if args.lut else None
    device = resolve_device(args.device)
    if lut is not None:
        lut_device = resolve_device(args.lut_device) if args.lut_device else device
        threads = args.lut_threads if args.lut_threads is not None else lut.meta.get("threads")
        lut.check_compatible(lut_device, args.lut_batch, args.lut_dtype, threads, force=args.force_lut)
    # every setting is checked here, before any data is read or anything is trained or written
    pruner = NViTPruner(
        target_macs=args.target_macs,
        target_params=args.target_params,
        target_latency=args.target_latency,
        lut=lut,
        out_dir=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        kinds=args.kinds,
        chunks=args.chunks,
        prune_steps=args.prune_steps,
        batches_per_step=args.batches_per_step,
        saliency_mode=args.saliency,
        criterion=args.criterion,
        latency_weight=args.latency_weight,
        eta=args.eta,
        min_emb=args.min_emb,
        round_to=args.round_to if args.round_to > 0 else None,
        train_steps_between=args.train_steps_between,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        amp=args.amp,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        label_smoothing=args.label_smoothing,
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
    device = D.setup_distributed(device)
    pruner.device = device
    if args.batch_size % D.world_size():
        raise VitPruneError(f"--batch-size {args.batch_size} must be a multiple of the {D.world_size()} processes")
    ev = eval_transform_for(model.config.preprocess, default=args.preset, img_size=args.img_size)
    if args.augment:
        interp = ev.interpolation if ev.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        train_tf = build_train_transform(
            ev.img_size, ev.mean, ev.std, scale=(0.35, 1.0), hflip=0.5, randaugment="none", interpolation=interp
        )
    else:
        train_tf = ev
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
        "lut": str(args.lut) if args.lut else None,
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
    pruned, target = report["pruned"], report["target"]
    frac = pruned["fraction"]
    msg = (
        f"NViT: kept {frac['macs']:.3f} of dense MACs, {frac['params']:.3f} of params"
        + (f", {frac['latency_pred']:.3f} of LUT latency" if "latency_pred" in frac else "")
        + f" (target {target['metric']} {target['fraction']:g}); embedding {report['dense']['embed_dim']} -> "
        f"{pruned['embed_dim']}, {pruned['depth']}/{report['dense']['depth']} blocks"
    )
    if "eval" in pruned:
        dense = report["dense"].get("eval", {})
        msg += f"; top-1 {dense.get('top1', float('nan')):.2f} % -> {pruned['eval']['top1']:.2f} %"
    print(msg)
    print(f"model: {out}/model  report: {out}/report.json  plot: {out}/dims.png")


def register_prune(methods: argparse._SubParsersAction) -> None:
    p = methods.add_parser(
        "nvit",
        help="NViT: global structural pruning with Hessian-aware saliency (optionally latency-aware)",
        description="NViT (Yang et al. 2023): score every head, QK dim, V dim, MLP neuron, embedding channel and "
        "block by I(S) = 1/2 E[(sum_S g w)^2], rank all of them in ONE list (optionally I(S) - eta * dLat(S) from a "
        "latency lookup table), remove the lowest chunks over several rounds until the MACs / params / latency "
        "target is met, build the smaller model (dims rounded to multiples of 8) and fine-tune it with distillation.",
    )
    p.add_argument("model", help="model to prune (vitprune dir, timm .pth/.safetensors, Hugging Face dir)")
    p.add_argument("--data", required=True, help="training images: DIR/<class>/<image>")
    p.add_argument("--classes", default=None, help="file whose line i names output i")
    p.add_argument("--val", default=None, help="validation images: dense, pruned and final top-1 in the report")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-macs", type=float, default=None, help="keep this fraction of the dense MACs, in (0, 1]")
    t.add_argument("--target-params", type=float, default=None, help="keep this fraction of the parameters")
    t.add_argument("--target-latency", type=float, default=None, help="keep this fraction of the LUT latency")
    n = p.add_argument_group("NViT")
    n.add_argument("--lut", default=None, metavar="FILE", help="latency table (vitprune lut build): latency-aware")
    n.add_argument("--lut-device", default=None, help="device the table must match (default: --device)")
    n.add_argument("--lut-batch", type=int, default=None, help="deployment batch size the table must match")
    n.add_argument("--lut-dtype", default=None, help="deployment dtype the table must match")
    n.add_argument("--lut-threads", type=int, default=None, help="CPU threads the table must match")
    n.add_argument("--force-lut", action="store_true", help="use a table built for another setting (warn only)")
    n.add_argument("--latency-weight", type=float, default=1.0, help="eta relative to median I / median dLat")
    n.add_argument("--eta", type=float, default=None, help="explicit eta (saliency per ms) instead")
    n.add_argument("--kinds", type=_kinds, default=("heads", "qk", "v", "mlp", "emb", "block"))
    n.add_argument("--chunks", type=_chunks, default={}, help="chunk sizes, e.g. emb=16,heads=1,qk=8,v=8,mlp=16")
    n.add_argument("--prune-steps", type=int, default=10, help="removal rounds")
    n.add_argument("--batches-per-step", type=int, default=8, help="saliency batches per round")
    n.add_argument("--saliency", choices=("labels", "distill"), default="labels", help="gradient source")
    n.add_argument("--criterion", choices=("saliency", "per_cost"), default="saliency")
    n.add_argument("--min-emb", type=int, default=None, help="never fewer embedding channels (default: one chunk)")
    n.add_argument("--round-to", type=int, default=8, help="round kept widths up to a multiple (0: off)")
    n.add_argument("--train-steps-between", type=int, default=0, help="distillation steps after each round")
    n.add_argument("--finetune-steps", type=int, default=0, help="distillation steps of the smaller model")
    n.add_argument("--lr", type=float, default=1e-4, help="learning rate between rounds")
    n.add_argument("--finetune-lr", type=float, default=1e-4)
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
    tr.add_argument("--augment", action="store_true", help="random resized crop + flip on training images")
    tr.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("data and run")
    d.add_argument("--preset", default="shared", help="preprocessing preset when the model records none")
    d.add_argument("--arch-preset", default=None, help="architecture preset for bare timm weights")
    d.add_argument("--img-size", type=int, default=None)
    d.add_argument("--limit-per-class", type=int, default=None, help="use the first N training images per class")
    d.add_argument("--val-limit-per-class", type=int, default=None)
    d.add_argument("--eval-batch-size", type=int, default=64)
    d.add_argument("--out", required=True, help="run directory: model/, report.json, dims.png, nvit_state.pt")
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    d.add_argument("--ckpt-every", type=int, default=200, help="fine-tuning checkpoint every N steps")
    d.add_argument("--log-every", type=int, default=50)
    d.add_argument("--workers", type=int, default=0)
    d.add_argument("--device", default="auto", help="cpu, cuda or auto")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_nvit)
