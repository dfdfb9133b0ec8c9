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

from vitprune.cli import _common
from vitprune.cli import argtypes as A
from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs, format_count, params_breakdown
from vitprune.models.vit import GATE_NAMES, ViT

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


# ------------------------------------------------------------------------------------ runtimes and INT8

RUNTIMES = ("torch", "onnxruntime", "openvino")
INT8_MODES = ("dynamic", "static")
PREPROCESS_CHOICES = ["shared", "imagenet", "inception"]


def _is_onnx(path: str) -> bool:
    return str(path).lower().endswith(".onnx")


def _names(text: str) -> tuple[str, ...]:
    """``a,b,c`` -> names; ``none`` -> no names."""
    names = tuple(k.strip() for k in text.split(",") if k.strip())
    return () if names == ("none",) else names


def _add_int8_args(p: argparse.ArgumentParser, *, torch_backend: bool) -> None:
    g = p.add_argument_group("INT8")
    g.add_argument("--int8", choices=INT8_MODES, help="quantize to INT8 (static: QDQ calibrated on --calib)")
    g.add_argument("--calib", metavar="DIR", help="calibration images for --int8 static (DIR/<class>/<img> or flat)")
    g.add_argument("--calib-images", type=int, default=256, metavar="N", help="calibration images used (256)")
    g.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)")
    g.add_argument(
        "--keep-fp32",
        type=_names,
        default=None,
        metavar="NAMES",
        help="nodes left in fp32, comma-separated: groups patch_embed, head, attention, mlp_fc2, node names or "
        "patterns (*/mlp/fc2/*), or 'none' (default: patch_embed,head; static adds mlp_fc2)",
    )
    g.add_argument("--no-graph-prep", action="store_true", help="skip quant_pre_process (shape inference, fusions)")
    if torch_backend:
        g.add_argument(
            "--torch-int8-backend",
            choices=("auto", "torchao", "torch.ao"),
            default="auto",
            help="INT8 dynamic for --runtime torch (auto: torchao if installed, else torch.ao)",
        )


def _check_int8_args(args: argparse.Namespace, runtimes: set[str]) -> None:
    """Refuse a bad INT8 request before anything is loaded or written."""
    if not args.int8:
        return
    if args.int8 == "static" and not args.calib:
        raise VitPruneError("--int8 static needs --calib DIR (calibration images)")
    if args.calib_images < 1:
        raise VitPruneError(f"--calib-images must be >= 1, got {args.calib_images}")
    if runtimes - {"torch"}:
        from vitprune.export.quantize import find_images, require_quantization

        require_quantization()
        if args.calib:
            find_images(args.calib)
    if "torch" in runtimes:
        if args.int8 == "static":
            raise VitPruneError("PyTorch INT8 is dynamic only: use --int8 dynamic, or --runtime onnxruntime")
        from vitprune.export.torch_int8 import resolve_backend

        resolve_backend(getattr(args, "torch_int8_backend", "auto"))


def _transform(preprocess: dict[str, Any] | None, explicit: str | None, img_size: int | None) -> Any:
    """``--preprocess`` when given, else what the model records, else the 'shared' preset."""
    from vitprune.data.transforms import build_eval_transform, eval_transform_for

    if explicit:
        return build_eval_transform(explicit, img_size=img_size)
    return eval_transform_for(preprocess, default="shared", img_size=img_size)


def _onnx_transform(runner: Any, explicit: str | None) -> Any:
    """Preprocessing of an ONNX model: ``--preprocess``, else its metadata; an ONNX without any needs the flag."""
    if not explicit and runner.preprocess is None and runner.vit_config is None:
        raise VitPruneError(f"{runner.path} records no preprocessing (not exported by vitprune): pass --preprocess")
    return _transform(runner.preprocess, explicit, runner.img_size)


def _export_metadata(model: ViT, explicit: str | None) -> dict[str, str]:
    """``vitprune_preprocess`` (``--preprocess`` or the model's record) and ``vitprune_num_classes``."""
    meta = {"vitprune_num_classes": str(model.config.num_classes)}
    preprocess = {"preset": explicit} if explicit else model.config.preprocess
    if preprocess:
        meta["vitprune_preprocess"] = json.dumps(preprocess)
    return meta


def _quantize_file(fp32: Path, out: Path, args: argparse.Namespace, transform: Any, overwrite: bool) -> dict:
    from vitprune.export.quantize import calibration_batches, quantize_onnx

    calib = calibration_batches(args.calib, transform, args.calib_images) if args.int8 == "static" else None
    return quantize_onnx(
        fp32,
        out,
        args.int8,
        calib=calib,
        per_channel=not args.per_tensor,
        exclude=args.keep_fp32,
        graph_prep=not args.no_graph_prep,
        calib_method=args.calib_method,
        overwrite=overwrite,
    )


def _runtime_of(path: str, requested: str | None) -> str:
    if requested == "torch" and _is_onnx(path):
        raise VitPruneError(f"{path} is an ONNX file: it runs with --runtime onnxruntime or openvino")
    return requested or ("onnxruntime" if _is_onnx(path) else "torch")


def prepare_model(path: str, args: argparse.Namespace, workdir: Path, role: str) -> tuple[Any, dict[str, Any]]:
    """MODEL as the runtime runs it: a torch module (optionally INT8 dynamic) or an ONNX runner; a torch MODEL
    with an ONNX runtime is exported (and quantized with ``--int8``) into ``workdir`` first. With ``--int8`` an
    fp32 ``.onnx`` file is quantized too; an INT8 one (``vitprune_int8`` metadata) runs as it is."""
    runtime = _runtime_of(path, args.runtime)
    img_size = getattr(args, "img_size", None)
    threads = getattr(args, "threads", None)
    info: dict[str, Any] = {"runtime": runtime, "int8": None}
    if runtime == "torch":
        model = load_cli_model(path, args.preset)
        if args.int8:
            from vitprune.export.torch_int8 import quantize_torch_dynamic

            model = quantize_torch_dynamic(model, args.torch_int8_backend)
            info["int8"] = model.int8
        return model, info
    from vitprune.runtime.ort import load_runner, read_metadata

    if _is_onnx(path) and not Path(path).is_file():
        raise VitPruneError(f"ONNX file not found: {path}")
    onnx_file = Path(path)
    if _is_onnx(path) and args.int8 and "vitprune_int8" not in read_metadata(path):
        fp32_runner = load_runner(path, "onnxruntime", threads=1)
        transform = _onnx_transform(fp32_runner, args.preprocess) if args.int8 == "static" else None
        onnx_file = Path(_quantize_file(onnx_file, workdir / f"{role}.int8.onnx", args, transform, False)["path"])
    elif not _is_onnx(path):
        from vitprune.export.onnx import export_onnx

        model = load_cli_model(path, args.preset)
        onnx_file = workdir / f"{role}.fp32.onnx"
        export_onnx(model, onnx_file, img_size=img_size, metadata=_export_metadata(model, args.preprocess))
        if args.int8:
            transform = _transform(model.config.preprocess, args.preprocess, img_size or model.config.img_size)
            res = _quantize_file(onnx_file, workdir / f"{role}.int8.onnx", args, transform, overwrite=False)
            onnx_file = Path(res["path"])
            info["int8_file_bytes"] = res["int8_file_bytes"]
        info["fp32_file_bytes"] = (workdir / f"{role}.fp32.onnx").stat().st_size
    runner = load_runner(onnx_file, runtime, threads=threads)
    info["int8"] = runner.int8
    info["onnx_file_bytes"] = onnx_file.stat().st_size
    return runner, info


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


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from vitprune.data.imagefolder import ImageFolderDataset, make_loader
    from vitprune.metrics.evaluate import evaluate
    from vitprune.utils.device import resolve_device

    if not Path(args.data).is_dir():
        raise VitPruneError(f"dataset folder not found: {args.data}")
    runtime = _runtime_of(args.model, args.runtime)
    _check_int8_args(args, {runtime})
    with tempfile.TemporaryDirectory(prefix="vitprune-eval-") as tmp:
        model, info = prepare_model(args.model, args, Path(tmp), "model")
        if runtime == "torch":
            cfg = model.config
            transform = _transform(cfg.preprocess, args.preprocess, cfg.img_size)
            device = resolve_device(args.device) if not args.int8 else torch.device("cpu")
        else:
            transform = _onnx_transform(model, args.preprocess)
            device = torch.device("cpu")
        classes = _common.classes_file(args.model, args.classes)
        dataset = ImageFolderDataset(args.data, transform, classes_file=classes, limit_per_class=args.limit_per_class)
        num_classes = getattr(model.config, "num_classes", None)
        if num_classes is not None and dataset.num_classes > num_classes:
            raise VitPruneError(f"{dataset.class_count_text()} but the model has {num_classes}")
        loader = make_loader(dataset, batch_size=args.batch_size, workers=args.workers)
        res = evaluate(model, loader, device=device, progress=not args.json and sys.stderr.isatty())
    out = {
        "model": args.model,
        "data": args.data,
        "classes_file": classes,
        "preprocess": repr(transform),
        **info,
        **res,
    }
    if args.json:
        _print_json(out)
    else:
        print(
            f"model: {args.model}\ndata: {args.data} ({res['n']} images)" + (f", classes {classes}" if classes else "")
        )
        print(f"preprocess: {transform!r}")
        if runtime != "torch" or info["int8"]:
            int8 = f", INT8 {info['int8']['mode']}" if info["int8"] else ""
            print(f"runtime: {runtime}{int8}")
        print(f"top1 {res['top1']:.2f} %  top5 {res['top5']:.2f} %  loss {res['loss']:.4f}  ({res['seconds']:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------------ bench


def _runtime_label(runtime: str, int8: dict[str, Any] | None) -> str:
    return runtime + (f" int8-{int8['mode']}" if int8 else " fp32")


def model_summary_of_config(cfg: Any, img_size: int | None = None) -> dict[str, int]:
    """Parameters and MACs of an architecture (ONNX and INT8 models are counted from their config)."""
    return {"params": params_breakdown(cfg)["total"], "macs": count_macs(cfg, img_size)["total"]}


def _fmt_stats(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label:<12} median {s['median_ms']:9.2f} ms  p10 {s['p10_ms']:9.2f}  p90 {s['p90_ms']:9.2f}  "
        f"{s['images_per_s']:9.1f} img/s"
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    from vitprune.metrics.latency import compare_latency, measure_latency
    from vitprune.metrics.memory import measure_peak_memory

    paths = {"model": args.model, **({"vs": args.vs} if args.vs else {})}
    runtimes = {key: _runtime_of(path, args.runtime) for key, path in paths.items()}
    _check_int8_args(args, set(runtimes.values()))
    if set(runtimes.values()) != {"torch"} or args.int8:
        if args.device != "cpu" or args.dtype != "float32":
            raise VitPruneError("ONNX runtimes and INT8 models run on --device cpu with --dtype float32")
        if args.memory:
            raise VitPruneError("--memory measures PyTorch fp32 models only")

    timing = {
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "threads": args.threads,
        "warmup": args.warmup,
        "runs": args.runs,
        "device": args.device,
        "dtype": DTYPES[args.dtype],
    }
    with tempfile.TemporaryDirectory(prefix="vitprune-bench-") as tmp:
        models, infos = {}, {}
        for key, path in paths.items():
            models[key], infos[key] = prepare_model(path, args, Path(tmp), key)
            patch = getattr(getattr(models[key], "config", None), "patch_size", None)
            if patch is not None:
                A.check_img_size(args.img_size, patch)
        if args.vs:
            res = compare_latency(models["model"], models["vs"], **timing)
            res = {**res, "model": args.model, "vs": args.vs}
        else:
            res = {**measure_latency(models["model"], **timing), "model": args.model}
    for key, model in models.items():
        res[f"{key}_runtime"], res[f"{key}_int8"] = infos[key]["runtime"], infos[key]["int8"]
        if "onnx_file_bytes" in infos[key]:
            res[f"{key}_onnx_file_bytes"] = infos[key]["onnx_file_bytes"]
        cfg = getattr(model, "vit_config", model.config) if infos[key]["runtime"] != "torch" else model.config
        summary = model_summary_of_config(cfg, args.img_size) if cfg is not None and hasattr(cfg, "blocks") else None
        res[f"{key}_params"] = summary["params"] if summary else None
        res[f"{key}_macs"] = summary["macs"] if summary else None
        if args.memory:
            mem = measure_peak_memory(model, args.batch_size, args.img_size, args.device, DTYPES[args.dtype])
            res[f"{key}_peak_memory_bytes"] = mem["peak_bytes"]
    res["torch"] = torch.__version__
    if any(r != "torch" for r in runtimes.values()):
        from vitprune.runtime.ort import require_onnxruntime

        res["onnxruntime"] = require_onnxruntime().__version__
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
        extra = f"  {_runtime_label(res[f'{key}_runtime'], res[f'{key}_int8'])}"
        if res[f"{key}_params"] is not None:
            extra += f"  params {format_count(res[f'{key}_params'])}  MACs {format_count(res[f'{key}_macs'])}"
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
    import tempfile

    from vitprune.export.onnx import export_onnx
    from vitprune.utils.fs import check_output

    check_output(args.onnx, "file", overwrite=args.overwrite)  # fail before loading anything
    _check_int8_args(args, {"onnxruntime"})
    if _is_onnx(args.model) and not args.int8:
        raise VitPruneError(f"{args.model} is already an ONNX file: add --int8 dynamic|static to quantize it")
    if not args.int8:
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
            metadata=_export_metadata(model, args.preprocess),
        )
    else:
        with tempfile.TemporaryDirectory(prefix="vitprune-export-") as tmp:
            if _is_onnx(args.model):
                from vitprune.runtime.ort import OrtModel

                fp32 = Path(args.model)
                if not fp32.is_file():
                    raise VitPruneError(f"ONNX file not found: {fp32}")
                transform = _onnx_transform(OrtModel(fp32, threads=1), args.preprocess) if args.calib else None
                fp32_res: dict[str, Any] = {}
            else:
                model = load_cli_model(args.model, args.preset)
                A.check_img_size(args.img_size, model.config.patch_size)
                fp32 = Path(tmp) / "fp32.onnx"
                fp32_res = export_onnx(
                    model,
                    fp32,
                    img_size=args.img_size,
                    batch_size=args.batch_size,
                    opset=args.opset,
                    dynamic_batch=not args.static_batch,
                    check=not args.no_check,
                    metadata=_export_metadata(model, args.preprocess),
                )
                size = args.img_size or model.config.img_size
                transform = _transform(model.config.preprocess, args.preprocess, size)
            res = _quantize_file(fp32, Path(args.onnx), args, transform, overwrite=args.overwrite)
        res = {**res, "max_abs_diff": fp32_res.get("max_abs_diff"), "onnx_file_bytes": res["int8_file_bytes"]}
    if args.json:
        _print_json({"model": args.model, **res})
    elif not args.int8:
        diff = (
            "not checked" if res["max_abs_diff"] is None else f"max |logit diff| vs PyTorch {res['max_abs_diff']:.2e}"
        )
        print(f"wrote {res['path']} ({res['onnx_file_bytes'] / 2**20:.2f} MiB, opset {res['opset']}; {diff})")
    else:
        mib = 2**20
        print(
            f"wrote {res['path']} (INT8 {res['mode']}, {res['nodes_quantized']} nodes quantized, "
            f"kept fp32: {', '.join(res['excluded_nodes']) or 'none'})"
        )
        print(
            f"size on disk: INT8 {res['int8_file_bytes'] / mib:.2f} MiB (fp32 {res['fp32_file_bytes'] / mib:.2f} MiB); "
            f"compressed (deflate): INT8 {res['int8_deflate_bytes'] / mib:.2f} MiB "
            f"(fp32 {res['fp32_deflate_bytes'] / mib:.2f} MiB); bitmask + INT8 values "
            f"{res['int8_bitmask_bytes'] / mib:.2f} MiB"
        )
        zeros = res["zero_weights_fp32"]
        if zeros:
            state = "all kept exactly" if res["zeros_kept"] else f"only {res['zero_weights_kept']:,} kept"
            print(f"zero weights: {zeros:,} in fp32, {state} in INT8")
        for note in res["notes"]:
            print(f"note: {note}")
    return 0


# --------------------------------------------------------------------------------------------------- register


def _add_runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="torch (default), onnxruntime (default for a .onnx MODEL; a torch MODEL is exported first) or openvino",
    )


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
        choices=PREPROCESS_CHOICES,
        help="preprocessing preset (default: what the model records, else 'shared')",
    )
    p.add_argument("--batch-size", type=A.positive_int, default=64)
    p.add_argument("--workers", type=A.nonneg_int, default=0, help="data-loading worker processes")
    p.add_argument(
        "--limit-per-class", type=A.positive_int, metavar="N", help="evaluate the first N images of each class"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _add_runtime_arg(p)
    _add_int8_args(p, torch_backend=True)
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
    p.add_argument(
        "--preprocess", choices=PREPROCESS_CHOICES, help="preprocessing of the --calib images (default: the model's)"
    )
    _add_runtime_arg(p)
    _add_int8_args(p, torch_backend=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", parents=[parent], help="export to ONNX, checked with onnxruntime")
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.add_argument("--opset", type=A.positive_int, default=17)
    p.add_argument("--img-size", type=A.positive_int, help="input size baked into the graph (default: the model's)")
    p.add_argument("--batch-size", type=A.positive_int, default=1, help="batch size of the traced / checked input")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension instead of a dynamic one")
    p.add_argument("--no-check", action="store_true", help="skip the onnx checker and the onnxruntime comparison")
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_CHOICES,
        help="preprocessing recorded in the ONNX metadata and used for --calib (default: the model's, else 'shared')",
    )
    _add_int8_args(p, torch_backend=False)
    p.set_defaults(func=cmd_export)
