"""``vitprune lut build | check``: latency lookup tables for latency-aware pruning (see vitprune/latency/lut.py)."""

from __future__ import annotations

import argparse
import json

from vitprune.cli import argtypes as A
from vitprune.latency.lut import DTYPES, RUNTIMES, LatencyTable, build_table, check_table, grid_for_config, parse_grid
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.utils.device import resolve_device
from vitprune.utils.fs import atomic_write_text, check_output


def _load_config(args: argparse.Namespace) -> ViTConfig | None:
    if not args.model:
        return None
    from vitprune.models.checkpoints import load_model

    return load_model(args.model, preset=args.preset).config


def cmd_build(args: argparse.Namespace) -> int:
    check_output(args.out, "file", overwrite=args.overwrite)
    device = resolve_device(args.device)
    config = _load_config(args)
    A.check_img_size(args.img_size, config.patch_size if config is not None else args.patch_size)
    if args.grid:
        grid = parse_grid(args.grid)
    elif config is not None:
        grid = grid_for_config(config)
    else:
        grid = None
    shape = {
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "in_chans": 3,
        "prefix_tokens": args.prefix_tokens,
        "num_classes": args.num_classes,
    }
    if config is not None:
        shape = {
            "img_size": args.img_size or config.img_size,
            "patch_size": config.patch_size,
            "in_chans": config.in_chans,
            "prefix_tokens": config.num_prefix_tokens,
            "num_classes": config.num_classes,
        }
    shape["img_size"] = shape["img_size"] or 224
    table = build_table(
        device=device,
        batch_size=args.batch,
        dtype=args.dtype,
        threads=args.threads,
        grid=grid,
        warmup=args.warmup,
        runs=args.runs,
        progress=not args.quiet,
        stat=args.stat,
        runtime=args.runtime,
        calibrate=config,
        **shape,
    )
    if config is not None:
        table.notes["model"] = args.model
    table.save(args.out, overwrite=args.overwrite)
    m = table.meta
    print(
        f"latency table: {args.out} ({m['runtime']}, {m['device_name']}, {m['dtype']}, batch {m['batch_size']}, "
        f"threads {m['threads']}, {m['tokens']} tokens)"
    )
    if config is not None:
        print(
            f"predicted latency of {args.model}: {table.predict(config):.2f} ms / batch "
            f"(table scaled x{table.scale:.3f} to its measured end-to-end latency)"
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.json:
        check_output(args.json, "file", overwrite=args.overwrite)
    table = LatencyTable.load(args.lut)
    device = resolve_device(args.device or table.meta["device_type"])
    runtime = args.runtime or table.runtime
    table.check_compatible(device, threads=table.meta["threads"], force=args.force, runtime=runtime)
    config = _load_config(args)
    if config is None:
        g, m = table.grid, table.meta
        heads = g["heads"][-1]
        blocks = [BlockConfig(heads, g["qk"][-1], g["v"][-1], g["mlp"][-1]) for _ in range(args.depth)]
        config = ViTConfig(
            embed_dim=g["emb"][-1],
            blocks=blocks,
            num_classes=m["num_classes"],
            img_size=m["img_size"],
            patch_size=m["patch_size"],
            in_chans=m["in_chans"],
            class_token=m["prefix_tokens"] >= 1,
            distilled=m["prefix_tokens"] >= 2,
            global_pool="token" if m["prefix_tokens"] >= 1 else "avg",
        )
    result = check_table(
        table,
        config,
        num_archs=args.archs,
        device=device,
        seed=args.seed,
        runs=args.runs,
        progress=not args.quiet,
        runtime=runtime,
    )
    for i, row in enumerate(result["archs"]):
        name = "dense" if i == 0 else f"random {i}"
        print(
            f"{name:>9}: predicted {row['predicted_ms']:9.2f} ms  measured {row['measured_ms']:9.2f} ms  "
            f"error {100 * row['rel_error']:5.1f} %"
        )
    print(
        f"relative error: median {100 * result['median_rel_error']:.1f} %, max {100 * result['max_rel_error']:.1f} % "
        f"({len(result['archs'])} architectures)"
    )
    if result["median_ratio_error"] is not None:
        print(
            f"error of latency relative to dense: median {100 * result['median_ratio_error']:.1f} %, "
            f"max {100 * result['max_ratio_error']:.1f} %"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n", overwrite=args.overwrite)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("lut", help="latency lookup tables: build on this device, check against measurements")
    lut = parser.add_subparsers(dest="lut_command", required=True, metavar="ACTION")

    p = lut.add_parser("build", help="time ViT block parts over a grid of dims and save the table (JSON)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--batch", type=A.positive_int, required=True, help="batch size the table is built (and valid) for")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=A.positive_int, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument(
        "--grid",
        help="grid, e.g. 'emb=48,96,144,192;heads=0,1,2,3;qk=8,24,40,64;v=8,24,40,64;mlp=0,192,384,576,768' "
        "(default: covering --model, else ViT-Tiny sized)",
    )
    p.add_argument("--model", metavar="MODEL", help="take tokens / classes / grid maxima from this model")
    p.add_argument("--preset", help="architecture for a checkpoint that does not record it")
    p.add_argument("--img-size", type=A.positive_int, help="input size (default: the model's, else 224)")
    p.add_argument("--patch-size", type=A.positive_int, default=16, help="without --model (default 16)")
    p.add_argument(
        "--prefix-tokens", type=A.nonneg_int, default=1, help="class (+ distillation) tokens without --model"
    )
    p.add_argument("--num-classes", type=A.nonneg_int, default=1000, help="classifier width without --model")
    p.add_argument("--warmup", type=A.nonneg_int, default=2)
    p.add_argument("--runs", type=A.positive_int, default=7, help="timed runs per grid point")
    p.add_argument(
        "--stat", choices=("median", "min"), default="median", help="per-point statistic (min: busy machines)"
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="time eager PyTorch (default) or each part exported to ONNX in an ONNX Runtime session",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output JSON file")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_build)

    p = lut.add_parser("check", help="predicted vs measured latency of random pruned architectures")
    p.add_argument("lut", metavar="LUT", help="latency table JSON from 'vitprune lut build'")
    p.add_argument("--model", metavar="MODEL", help="architecture to prune randomly (default: the grid maxima)")
    p.add_argument("--preset", help="architecture for a checkpoint that does not record it")
    p.add_argument("--depth", type=A.positive_int, default=12, help="blocks of the default architecture (default 12)")
    p.add_argument("--device", help="default: the table's device type")
    p.add_argument("--archs", type=A.nonneg_int, default=5, help="random architectures besides the dense one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=A.positive_int, default=5)
    p.add_argument("--runtime", choices=RUNTIMES, help="measure with this runtime (default: the table's)")
    p.add_argument(
        "--force", action="store_true", help="use a table built for another device/batch/dtype/runtime (warn)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)
