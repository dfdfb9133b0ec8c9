"""``vitprune info | eval | bench | export``: look at, evaluate, time and export one model.

MODEL is anything :func:`vitprune.models.checkpoints.load_model` reads: a saved vitprune directory, a timm/DeiT
checkpoint file (``--preset`` names the architecture when the file does not), or a Hugging Face directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vitprune.cli import argtypes as A
from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs, format_count, params_breakdown
from vitprune.models.vit import GATE_NAMES, ViT

CLASSES_FILE = "classes.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_cli_model(path: str, preset: str | None = None) -> ViT:
    from vitprune.models.checkpoints import load_model

    return load_model(path, preset=preset)


def gate_names(model: torch.nn.Module) -> list[str]:
    """Names of the gates (masks / learnable scales) set on ``model``."""
    tensors = [*model.named_buffers(), *model.named_parameters()]
    return sorted(name for name, _ in tensors if name.rsplit(".", 1)[-1] in GATE_NAMES)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _model_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("model", metavar="MODEL", help="vitprune model directory or checkpoint file")
    parent.add_argument("--preset", help="architecture for a checkpoint that does not record it (timm model name)")
    parent.add_argument("--json", action="store_true", help="print the result as JSON")
    return parent


# ------------------------------------------------------------------------------------------------------- info


def model_summary(model: ViT, img_size: int | None = None) -> dict[str, Any]:
    """Architecture, parameters and MACs per block and in total (the data ``vitprune info`` prints)."""
    cfg = model.config
    macs = count_macs(cfg, img_size)
    params = params_breakdown(cfg)
    blocks = [
        {
            "heads": b.heads,
            "qk_dim": b.qk_dim,
            "v_dim": b.v_dim,
            "mlp_dim": b.mlp_dim,
            "params": p["total"],
            "macs": m["total"],
            "attn_macs": m["attn"],
            "mlp_macs": m["mlp"],
        }
        for b, p, m in zip(cfg.blocks, params["per_block"], macs["per_block"], strict=True)
    ]
    return {
        "name": cfg.name,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_classes": cfg.num_classes,
        "img_size": macs["img_size"][0],
        "patch_size": cfg.patch_size,
        "tokens": macs["tokens"],
        "distilled": cfg.distilled,
        "global_pool": cfg.global_pool,
        "uniform": cfg.is_uniform(),
        "blocks": blocks,
        "params": params["total"],
        "params_embed": params["embed"],
        "params_head": params["head"],
        "macs": macs["total"],
        "macs_patch_embed": macs["patch_embed"],
        "macs_head": macs["head"],
        "flops": 2 * macs["total"],
        "gates": gate_names(model),
        "preprocess": cfg.preprocess,
    }


def _print_summary(s: dict[str, Any], source: str) -> None:
    print(f"model: {source} ({s['name']})")
    print(
        f"embed {s['embed_dim']}, {s['depth']} blocks, {s['num_classes']} classes, {s['img_size']} px, "
        f"patch {s['patch_size']}, {s['tokens']} tokens" + (", distilled" if s["distilled"] else "")
    )
    header = f"{'block':>5} {'heads':>5} {'qk':>4} {'v':>4} {'mlp':>5} {'params':>9} {'MACs':>9}"
    print(header)
    print("-" * len(header))
    for i, b in enumerate(s["blocks"]):
        print(
            f"{i:>5} {b['heads']:>5} {b['qk_dim']:>4} {b['v_dim']:>4} {b['mlp_dim']:>5} "
            f"{format_count(b['params']):>9} {format_count(b['macs']):>9}"
        )
    print("-" * len(header))
    print(f"{'embed + tokens':<26} {format_count(s['params_embed']):>9} {format_count(s['macs_patch_embed']):>9}")
    print(f"{'head':<26} {format_count(s['params_head']):>9} {format_count(s['macs_head']):>9}")
    print(f"{'total':<26} {format_count(s['params']):>9} {format_count(s['macs']):>9}")
    print(f"params {s['params']:,}  MACs {s['macs']:,}  FLOPs {s['flops']:,} (per image)")
    if s["gates"]:
        print(f"gates set ({len(s['gates'])}): the model is masked, counts are of the full-size tensors")


def cmd_info(args: argparse.Namespace) -> int:
    model = load_cli_model(args.model, args.preset)
    A.check_img_size(args.img_size, model.config.patch_size)
    summary = model_summary(model, args.img_size)
    if args.json:
        _print_json({"model": args.model, **summary})
    else:
        _print_summary(summary, args.model)
    return 0


# ------------------------------------------------------------------------------------------------------- eval


def _classes_file(model_path: str, explicit: str | None) -> str | None:
    """``--classes``, else a ``classes.txt`` next to the model (the order of its outputs), else None."""
    if explicit:
        return explicit
    p = Path(model_path)
    candidate = (p if p.is_dir() else p.parent) / CLASSES_FILE
    return str(candidate) if candidate.is_file() else None


def cmd_eval(args: argparse.Namespace) -> int:
    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.data.transforms import build_eval_transform, eval_transform_for
    from vitprune.metrics.evaluate import evaluate
    from vitprune.utils.device import resolve_device

    if not Path(args.data).is_dir():
        raise VitPruneError(f"dataset folder not found: {args.data}")
    device = resolve_device(args.device)
    model = load_cli_model(args.model, args.preset)
    cfg = model.config
    if args.preprocess:
        transform = build_eval_transform(args.preprocess, img_size=cfg.img_size)
    else:
        transform = eval_transform_for(cfg.preprocess, default="shared", img_size=cfg.img_size)
    classes = _classes_file(args.model, args.classes)
    dataset = ImageFolderDataset(args.data, transform, classes_file=classes, limit_per_class=args.limit_per_class)
    if dataset.num_classes > cfg.num_classes:
        raise VitPruneError(f"{dataset.class_count_text()} but the model has {cfg.num_classes}")
    loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers)
    res = evaluate(model, loader, device=device, progress=not args.json and sys.stderr.isatty())
    out = {"model": args.model, "data": args.data, "classes_file": classes, "preprocess": repr(transform), **res}
    if args.json:
        _print_json(out)
    else:
        print(
            f"model: {args.model}\ndata: {args.data} ({res['n']} images)" + (f", classes {classes}" if classes else "")
        )
        print(f"preprocess: {transform!r}")
        print(f"top1 {res['top1']:.2f} %  top5 {res['top5']:.2f} %  loss {res['loss']:.4f}  ({res['seconds']:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------------ bench


def _fmt_stats(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label:<12} median {s['median_ms']:9.2f} ms  p10 {s['p10_ms']:9.2f}  p90 {s['p90_ms']:9.2f}  "
        f"{s['images_per_s']:9.1f} img/s"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from vitprune.metrics.latency import compare_latency, measure_latency
    from vitprune.metrics.memory import measure_peak_memory

    timing = {
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "threads": args.threads,
        "warmup": args.warmup,
        "runs": args.runs,
        "device": args.device,
        "dtype": DTYPES[args.dtype],
    }
    models = {"model": load_cli_model(args.model, args.preset)}
    if args.vs:
        models["vs"] = load_cli_model(args.vs, args.preset)
    for m in models.values():
        A.check_img_size(args.img_size, m.config.patch_size)
    if args.vs:
        res = compare_latency(models["model"], models["vs"], **timing)
        res = {**res, "model": args.model, "vs": args.vs}
    else:
        res = {**measure_latency(models["model"], **timing), "model": args.model}
    for key, model in models.items():
        summary = model_summary(model, args.img_size)
        res[f"{key}_params"], res[f"{key}_macs"] = summary["params"], summary["macs"]
        if args.memory:
            mem = measure_peak_memory(model, args.batch_size, args.img_size, args.device, DTYPES[args.dtype])
            res[f"{key}_peak_memory_bytes"] = mem["peak_bytes"]
    res["torch"] = torch.__version__
    if args.json:
        _print_json(res)
        return 0
    print(
        f"batch {res['batch_size']}, {res['img_size']} px, {res['device']} {res['dtype']}, {res['threads']} threads, "
        f"{args.runs} runs after {args.warmup} warm-up" + (" (alternating)" if args.vs else "")
    )
    rows = [("model", args.model, res["a"] if args.vs else res)]
    if args.vs:
        rows.append(("vs", args.vs, res["b"]))
    for key, path, stats in rows:
        extra = f"  params {format_count(res[f'{key}_params'])}  MACs {format_count(res[f'{key}_macs'])}"
        if args.memory:
            extra += f"  peak mem {res[f'{key}_peak_memory_bytes'] / 2**20:.1f} MiB"
        print(_fmt_stats(key, stats) + extra + f"  {path}")
    if args.vs:
        print(
            f"speed-up of vs over model: {res['ratio']:.3f}x "
            f"(per-round p10 {res['ratio_p10']:.3f}x, p90 {res['ratio_p90']:.3f}x)"
        )
    return 0


# ----------------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from vitprune.export.onnx import export_onnx
    from vitprune.utils.fs import check_output

    check_output(args.onnx, "file", overwrite=args.overwrite)  # fail before loading anything
    model = load_cli_model(args.model, args.preset)
    A.check_img_size(args.img_size, model.config.patch_size)
    res = export_onnx(
        model,
        args.onnx,
        img_size=args.img_size,
        batch_size=args.batch_size,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        overwrite=args.overwrite,
        check=not args.no_check,
    )
    if args.json:
        _print_json({"model": args.model, **res})
    else:
        diff = (
            "not checked" if res["max_abs_diff"] is None else f"max |logit diff| vs PyTorch {res['max_abs_diff']:.2e}"
        )
        print(f"wrote {res['path']} ({res['onnx_file_bytes'] / 2**20:.2f} MiB, opset {res['opset']}; {diff})")
    return 0


# --------------------------------------------------------------------------------------------------- register


def register(sub: argparse._SubParsersAction) -> None:
    parent = _model_parent()

    p = sub.add_parser("info", parents=[parent], help="architecture, parameters and MACs per block")
    p.add_argument("--img-size", type=A.positive_int, help="count MACs at this input size (default: the model's)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", parents=[parent], help="top-1/top-5 accuracy on an image folder")
    p.add_argument("--data", required=True, metavar="DIR", help="image folder: DIR/<class>/<image>")
    p.add_argument("--classes", metavar="FILE", help="class names in output order (default: classes.txt by MODEL)")
    p.add_argument(
        "--preprocess",
        choices=["shared", "imagenet", "inception"],
        help="preprocessing preset (default: what the model records, else 'shared')",
    )
    p.add_argument("--batch-size", type=A.positive_int, default=64)
    p.add_argument("--workers", type=A.nonneg_int, default=0, help="data-loading worker processes")
    p.add_argument(
        "--limit-per-class", type=A.positive_int, metavar="N", help="evaluate the first N images of each class"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[parent], help="forward latency; side by side with --vs")
    p.add_argument("--vs", metavar="MODEL2", help="time MODEL2 alternately with MODEL and report the speed-up")
    p.add_argument("--batch-size", type=A.positive_int, default=32)
    p.add_argument("--img-size", type=A.positive_int, help="input size (default: the model's)")
    p.add_argument("--threads", type=A.positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--runs", type=A.positive_int, default=10)
    p.add_argument("--warmup", type=A.nonneg_int, default=3)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--memory", action="store_true", help="also measure the peak memory of one forward pass")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", parents=[parent], help="export to ONNX, checked with onnxruntime")
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--opset", type=A.positive_int, default=17)
    p.add_argument("--img-size", type=A.positive_int, help="input size baked into the graph (default: the model's)")
    p.add_argument("--batch-size", type=A.positive_int, default=1, help="batch size of the traced / checked input")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension instead of a dynamic one")
    p.add_argument("--no-check", action="store_true", help="skip the onnx checker and the onnxruntime comparison")
    p.set_defaults(func=cmd_export)
