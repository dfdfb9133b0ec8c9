"""``vitprune prune vtp``: VTP (learned dimension gates + L1 sparsity), thin over :class:`VTPPruner`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from vitprune.cli import _common as C
from vitprune.recipes import add_recipe_option


def cmd_vtp(args: argparse.Namespace) -> int:
    from vitprune.data.transforms import eval_transform_for
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.vtp import VTPPruner
    from vitprune.training import distributed as D
    from vitprune.training.runinfo import loadavg
    from vitprune.utils.device import resolve_device

    t0 = time.perf_counter()
    C.check_threads_and_batch(args)
    # every setting is checked here, before any data is read or anything is trained or written
    pruner = VTPPruner(
        target_macs=args.target_macs,
        target_params=args.target_params,
        lam=args.lam,
        gates=args.gates,
        sparsity_steps=args.sparsity_steps,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        gate_lr=args.gate_lr if args.gate_lr > 0 else None,
        finetune_lr=args.finetune_lr,
        round_to=args.round_to if args.round_to > 0 else None,
        **C.pruner_train_kwargs(args),
    )
    model = load_model(args.model, preset=args.arch_preset)
    pruner.check(model)
    teacher = C.load_teacher(args, model)
    device = D.setup_distributed(resolve_device(args.device))
    pruner.device = device
    C.check_batch_multiple(args.batch_size)
    img_size = args.img_size or (model.config.preprocess or {}).get("img_size") or model.config.img_size
    ev = eval_transform_for(model.config.preprocess, default=args.preset, img_size=img_size)
    train_tf = C.train_transform_for(ev, scale=args.crop_scale, hflip=args.hflip)
    loader, eval_fn = C.build_image_loaders(args, model, device, train_tf, ev)
    load_start = loadavg()
    _, report = pruner.prune(model, loader, teacher=teacher, eval_fn=eval_fn)
    report["run"] = C.run_info(args, load_start, t0)
    return C.finish_report(pruner.out_dir, report, lambda: _print_summary(report, args.out))


def _print_summary(report: dict[str, Any], out: str) -> None:
    sel, pruned = report["selection"], report["pruned"]
    msg = (
        f"VTP: kept {pruned['fraction']['macs']:.3f} of dense MACs, {pruned['fraction']['params']:.3f} of params "
        f"(target {sel['metric']} {sel['target_fraction']:g}); removed {sel['removed']} of {sel['candidates']} "
        f"gated units at |a| <= {sel['threshold']}"
    )
    msg += C.top1_change(report)
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
    C.add_prune_inputs(p)
    v = p.add_argument_group("VTP")
    v.add_argument("--lambda", dest="lam", type=float, default=1e-4, help="L1 weight on the gates (default 1e-4)")
    v.add_argument("--gates", type=C.parse_names, default=("qk", "v", "mlp"), help="qk,v,mlp (default) plus heads, emb")
    v.add_argument("--sparsity-steps", type=int, default=1000, help="steps of L1 sparsity training")
    v.add_argument("--finetune-steps", type=int, default=1000, help="steps of fine-tuning after surgery (0: none)")
    v.add_argument("--lr", type=float, default=1e-4, help="learning rate of the weights in sparsity training")
    v.add_argument("--gate-lr", type=float, default=1e-2, help="extra AdamW step on the gates; 0: none (paper)")
    v.add_argument("--finetune-lr", type=float, default=1e-4)
    v.add_argument("--round-to", type=int, default=8, help="round kept QK/V/MLP/emb widths up to a multiple (0: off)")
    tr = C.add_distill_train_args(p)
    C.add_crop_scale_arg(tr)
    tr.add_argument("--hflip", type=float, default=0.5)
    tr.add_argument("--seed", type=int, default=0)
    C.add_prune_run_args(
        p,
        out_help="run directory: model/, report.json, dims.png, checkpoints",
        ckpt_help="checkpoint every N steps (and at each phase's end)",
    )
    p.set_defaults(func=cmd_vtp)
    add_recipe_option(p, "vtp")
