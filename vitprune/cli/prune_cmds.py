"""``vitprune prune METHOD MODEL --data DIR --out DIR``: one command path for every registered method.

One sub-command per entry of :mod:`vitprune.pruners`' registry (plus ``pipeline`` for recipes with stages),
its options generated from :class:`~vitprune.pruners.run_options.RunOptions` and the method's config dataclass.
:func:`cmd_prune` checks every setting and the output directory, loads model, teacher and data once, calls the
pruner and writes the outputs with the one writer (:func:`vitprune.pruners.output.write_results`).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from vitprune.errors import VitPruneError

PIPELINE = "pipeline"


def _device(args: argparse.Namespace):
    from vitprune.utils.device import resolve_device

    return resolve_device(args.device)


def build_pruner(args: argparse.Namespace) -> Any:
    """The configured pruner (or pipeline) of ``args``: every setting validated here, before any loading."""
    from vitprune.pruners import create, get
    from vitprune.pruners.settings import values_from_args

    if args.method_name == PIPELINE:
        from vitprune.pruners.compose import Pipeline

        stages = (args.recipe_info or {}).get("stages")
        if not stages:
            raise VitPruneError("'vitprune prune pipeline' needs --recipe FILE with 'stages' (see docs/RECIPES.md)")
        return Pipeline([(s["method"], s["settings"]) for s in stages])
    cls = get(args.method_name)
    return create(args.method_name, **values_from_args(cls.Config, args))


def _loaders(args: argparse.Namespace, model: Any, pruner: Any, device: Any) -> tuple[Any, Any]:
    """``PruneData`` (calibration + training loaders from ``--data``) and the ``--val`` evaluation function."""
    import torch
    from torch.utils.data import Subset

    from vitprune.cli import _common as C
    from vitprune.data.imagefolder import make_loader
    from vitprune.data.transforms import eval_transform_for
    from vitprune.pruners.base import PruneData

    img_size = getattr(args, "img_size", None) or (model.config.preprocess or {}).get("img_size")
    img_size = img_size or model.config.img_size
    ev = eval_transform_for(model.config.preprocess, default=args.preprocess, img_size=img_size)
    train_tf = C.train_transform_for(ev, scale=tuple(args.crop_scale), hflip=args.hflip) if args.augment else ev
    train_loader, eval_fn = C.build_image_loaders(args, model, device, train_tf, ev)
    n_calib = args.calib_images if args.calib_images is not None else pruner.calibration_images()
    if n_calib is None:
        calib = train_loader  # structural scores stream the (shuffled) training data, as the papers do
    elif n_calib == 0:
        calib = None  # magnitude needs no data
    else:
        data = C.load_train_set(args, model, ev)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(data), generator=g)[: min(n_calib, len(data))].tolist()
        calib = make_loader(Subset(data, idx), args.calib_batch_size, workers=args.workers)
    return PruneData(calib, train_loader), eval_fn


def cmd_prune(args: argparse.Namespace) -> int:
    from vitprune.cli import _common as C
    from vitprune.models.checkpoints import load_model
    from vitprune.pruners.output import prepare_run_dir, summary_lines, write_results
    from vitprune.pruners.run_options import RunOptions
    from vitprune.pruners.settings import values_from_args
    from vitprune.training import distributed as D
    from vitprune.training import fingerprint as F
    from vitprune.training.runinfo import loadavg

    t0 = time.perf_counter()
    for flag in ("data", "out"):
        if not getattr(args, flag):
            raise VitPruneError(f"--{flag} is required")
    RunOptions(**values_from_args(RunOptions, args))  # every run option checked (ranges, order) before any work
    C.check_threads_and_batch(args)
    args.classes = C.classes_file(args.model, args.classes)
    pruner = build_pruner(args)
    out = prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    fingerprint = F.run_fingerprint(
        F.settings_from_args(args, path_dests=("lut",)),
        models={"model": args.model, "teacher": args.teacher},
        data={"data": args.data, "val": args.val, "classes": args.classes, "lut": getattr(args, "lut", None)},
    )
    if args.resume:  # the same run, or nothing: settings, model and data must be those it started with
        F.check_resume_fingerprint(out, fingerprint)
    model = load_model(args.model, preset=args.preset)
    device = _device(args)
    pruner.check(model, device)
    teacher = C.load_teacher(args, model)
    device = D.setup_distributed(device)
    C.check_batch_multiple(args.batch_size)
    data, eval_fn = _loaders(args, model, pruner, device)
    if D.rank() == 0:
        F.write_fingerprint(out, fingerprint)
    load_start = loadavg()
    results = pruner.prune(model, data, teacher, workdir=out, resume=args.resume, device=device, eval_fn=eval_fn)
    run = C.run_info(args, load_start, t0, method=args.method_name)
    write_results(results, out, run=run, recipe=args.recipe_info, compressed=args.compressed, dense_config=model.config)
    if D.rank() == 0:
        print("\n".join(summary_lines(results, out)))
    return 0


def _description(cls: Any) -> str:
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split()) + (f" Paper: {cls.paper}." if cls.paper else "")


def register(sub: argparse._SubParsersAction) -> None:
    from vitprune.pruners import available, get
    from vitprune.pruners.run_options import RunOptions
    from vitprune.pruners.settings import add_options
    from vitprune.recipes import add_recipe_option

    parser = sub.add_parser("prune", help=f"prune a model ({', '.join(available())}, {PIPELINE})")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in [*available(), PIPELINE]:
        cls = get(name) if name != PIPELINE else None
        p = methods.add_parser(
            name,
            help=cls.summary if cls else "stages of methods from a recipe (e.g. NViT, then OBS on what remains)",
            description=_description(cls) if cls else "Run the stages of --recipe FILE one after the other.",
        )
        p.add_argument("model", help="model to prune (vitprune dir or run dir, timm .pth/.safetensors, HF dir)")
        add_options(p, RunOptions, title="data and run")
        if cls is not None:
            add_options(p, cls.Config, title=f"{name} settings")
        p.set_defaults(func=cmd_prune, method_name=name)
        add_recipe_option(p, name)
