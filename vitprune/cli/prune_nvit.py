"""``vitprune prune nvit``: NViT global structural pruning with Hessian-aware saliency, thin over NViTPruner."""

from __future__ import annotations

import argparse
import time
from typing import Any

from vitprune.cli import _common as C
from vitprune.recipes import add_recipe_option


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


def cmd_nvit(args: argparse.Namespace) -> int:
    from vitprune.data.transforms import eval_transform_for
    from vitprune.latency.lut import LatencyTable
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.nvit import NViTPruner
    from vitprune.training import distributed as D
    from vitprune.training.runinfo import loadavg
    from vitprune.utils.device import resolve_device

    t0 = time.perf_counter()
    C.check_threads_and_batch(args)
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
        **C.pruner_train_kwargs(args),
    )
    model = load_model(args.model, preset=args.arch_preset)
    pruner.check(model)
    teacher = C.load_teacher(args, model)
    device = D.setup_distributed(device)
    pruner.device = device
    C.check_batch_multiple(args.batch_size)
    ev = eval_transform_for(model.config.preprocess, default=args.preset, img_size=args.img_size)
    train_tf = C.train_transform_for(ev, scale=(0.35, 1.0), hflip=0.5) if args.augment else ev
    loader, eval_fn = C.build_image_loaders(args, model, device, train_tf, ev)
    load_start = loadavg()
    _, report = pruner.prune(model, loader, teacher=teacher, eval_fn=eval_fn)
    report["run"] = C.run_info(args, load_start, t0, lut=str(args.lut) if args.lut else None)
    return C.finish_report(pruner.out_dir, report, lambda: _print_summary(report, args.out))


def _print_summary(report: dict[str, Any], out: str) -> None:
    pruned, target = report["pruned"], report["target"]
    frac = pruned["fraction"]
    msg = (
        f"NViT: kept {frac['macs']:.3f} of dense MACs, {frac['params']:.3f} of params"
        + (f", {frac['latency_pred']:.3f} of LUT latency" if "latency_pred" in frac else "")
        + f" (target {target['metric']} {target['fraction']:g}); embedding {report['dense']['embed_dim']} -> "
        f"{pruned['embed_dim']}, {pruned['depth']}/{report['dense']['depth']} blocks"
    )
    msg += C.top1_change(report)
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
    t = C.add_prune_inputs(p)
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
    n.add_argument("--kinds", type=C.parse_names, default=("heads", "qk", "v", "mlp", "emb", "block"))
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
    tr = C.add_distill_train_args(p)
    tr.add_argument("--augment", action="store_true", help="random resized crop + flip on training images")
    tr.add_argument("--seed", type=int, default=0)
    C.add_prune_run_args(
        p,
        out_help="run directory: model/, report.json, dims.png, nvit_state.pt",
        ckpt_help="fine-tuning checkpoint every N steps",
    )
    p.set_defaults(func=cmd_nvit)
    add_recipe_option(p, "nvit")
