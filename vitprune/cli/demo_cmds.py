"""``vitprune demo`` (every method on the shipped Fashion-MNIST ViT, one table, one report directory) and
``vitprune recipes`` (list or show the packaged pruning recipes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitprune.cli import argtypes as A
from vitprune.errors import VitPruneError


def cmd_demo(args: argparse.Namespace) -> int:
    from vitprune.demo import DEFAULT_OUT, DemoConfig, format_table, run_demo, summary_json
    from vitprune.training.runinfo import command_line
    from vitprune.utils.fs import check_output, is_run_output

    if args.threads is not None and args.threads <= 0:
        raise VitPruneError(f"--threads must be positive, got {args.threads}")
    check_output(args.out or DEFAULT_OUT, "dir", overwrite=args.overwrite, is_run_dir=is_run_output)
    from vitprune.cli.train_cmds import check_fashion_mnist_root

    check_fashion_mnist_root(args.data, flag="--data")
    model = None
    if args.model:
        from vitprune.models.checkpoints import load_model

        model = load_model(args.model)
    out = args.out or DEFAULT_OUT
    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.target_macs is not None:
        config.nvit_target_macs = args.target_macs
    if args.sparsity is not None:
        config.sparsity = args.sparsity
    if args.threads is not None:
        config.threads = args.threads
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.quiet else (lambda msg: None)
    report = run_demo(
        out,
        overwrite=args.overwrite,
        quick=args.quick,
        config=config,
        model=model,
        data_root=args.data,
        log=log,
        command=command_line(getattr(args, "argv", None)),
    )
    if args.json:
        print(summary_json(report))
        return 0
    t = report["timings"]["total"]
    print(format_table(report["rows"]))
    note = " (--quick: tiny budgets, the numbers mean nothing)" if args.quick else ""
    print(
        f"\nreport: {out}/report.md (+ report.json, plots, models/); "
        f"{t['wall_s']:.0f} s wall, {t['cpu_s']:.0f} s CPU{note}"
    )
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from vitprune.recipes import list_recipes, load_recipe

    if args.name is None:
        for name in list_recipes():
            r = load_recipe(name)
            print(f"{name:22s} v{r.version}  {r.method:5s} {r.description}")
        return 0
    recipe = load_recipe(args.name)
    print(Path(recipe.path).read_text().rstrip())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="prune the shipped Fashion-MNIST ViT with every method and compare them in one table",
        description="Prune the embedded default model (a small ViT trained on Fashion-MNIST) with NViT, VTP and an "
        "L2-magnitude structural baseline (same MACs), and with oViT/OBS and global magnitude (same sparsity); give "
        "each the same short distillation recovery; time all models side by side in one run and score top-1 on the "
        "Fashion-MNIST test set. Prints one table and writes a report directory (report.md, report.json, plots, "
        "models). Needs no download: Fashion-MNIST comes from the Debian package dataset-fashion-mnist.",
    )
    p.add_argument("--out", default=None, help="report directory (default: ./vitprune-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    p.add_argument("--quick", action="store_true", help="tiny budgets and data subsets (seconds; for tests)")
    p.add_argument("--json", action="store_true", help="print the table rows as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--target-macs",
        type=A.float_in(0, 1, lo_open=True, hi_open=True),
        default=None,
        help="structural methods keep this fraction of the MACs (0.4)",
    )
    p.add_argument(
        "--sparsity",
        type=A.float_in(0, 1, lo_open=True, hi_open=True),
        default=None,
        help="unstructured methods' sparsity (0.8)",
    )
    p.add_argument(
        "--threads", type=A.positive_int, default=None, help="torch CPU threads (default 1: the model is tiny)"
    )
    p.add_argument("--data", default=None, metavar="DIR", help="Fashion-MNIST IDX folder (default: Debian's)")
    p.add_argument(
        "--model", default=None, help="another 28x28 grey, 10-class model instead of the shipped one (vitprune dir)"
    )
    p.set_defaults(func=cmd_demo)

    r = sub.add_parser("recipes", help="list the packaged pruning recipes, or print one")
    r.add_argument("name", nargs="?", default=None, help="recipe name (or file) to print")
    r.set_defaults(func=cmd_recipes)
