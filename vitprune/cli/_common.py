"""Pieces shared by the training CLI commands (``prune nvit``, ``prune vtp``, ``finetune``): option blocks,
ImageFolder datasets and loaders built from the model's preprocessing, the teacher, and the run record.

Heavy imports stay inside the functions so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitprune.errors import VitPruneError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

    from vitprune.data.imagefolder import ImageFolderDataset
    from vitprune.data.transforms import EvalTransform
    from vitprune.models.vit import ViT
    from vitprune.training.augment import Compose

EvalFn = Callable[[torch.nn.Module], dict[str, Any]]

# ------------------------------------------------------------------------------------------- options


def parse_pair(text: str) -> tuple[float, float]:
    """argparse type for ``LO,HI``: two floats."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'LO,HI', got {text!r}") from None
    return lo, hi


def parse_names(text: str) -> tuple[str, ...]:
    """argparse type for ``a,b,c``: the non-empty comma-separated names."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def add_data_args(p: argparse.ArgumentParser, *, val_help: str, classes_last: bool = False) -> None:
    """``--data``, ``--classes`` and ``--val`` (``--classes`` after ``--val`` with ``classes_last``)."""
    p.add_argument("--data", required=True, help="training images: DIR/<class>/<image>")
    if not classes_last:
        p.add_argument("--classes", default=None, help="file whose line i names output i")
    p.add_argument("--val", default=None, help=val_help)
    if classes_last:
        p.add_argument("--classes", default=None, help="file whose line i names output i")


def add_preprocess_args(g: argparse._ActionsContainer) -> None:
    """``--preset``, ``--arch-preset`` and ``--img-size``: how the model is read and its images prepared."""
    g.add_argument("--preset", default="shared", help="preprocessing preset when the model records none")
    g.add_argument("--arch-preset", default=None, help="architecture preset for bare timm weights")
    g.add_argument("--img-size", type=int, default=None)


def add_crop_scale_arg(g: argparse._ActionsContainer) -> None:
    """``--crop-scale LO,HI``: the RandomResizedCrop area range of the training transform."""
    g.add_argument("--crop-scale", type=parse_pair, default=(0.35, 1.0), help="RandomResizedCrop area range LO,HI")


def add_limit_args(g: argparse._ActionsContainer, *, limit_help: str | None) -> None:
    """``--limit-per-class``, ``--val-limit-per-class`` and ``--eval-batch-size``."""
    g.add_argument("--limit-per-class", type=int, default=None, help=limit_help)
    g.add_argument("--val-limit-per-class", type=int, default=None)
    g.add_argument("--eval-batch-size", type=int, default=64)


def add_prune_inputs(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """The pruning commands' MODEL, ``--data``/``--classes``/``--val`` and the required target group with
    ``--target-macs`` and ``--target-params``; returns the group for further targets."""
    p.add_argument("model", help="model to prune (vitprune dir, timm .pth/.safetensors, Hugging Face dir)")
    add_data_args(p, val_help="validation images: dense, pruned and final top-1 in the report")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-macs", type=float, default=None, help="keep this fraction of the dense MACs, in (0, 1]")
    t.add_argument("--target-params", type=float, default=None, help="keep this fraction of the parameters")
    return t


def add_distill_train_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "training" group of the pruning commands (optimizer, AMP, teacher and distillation options).

    Returns the group: the caller adds its augmentation options and ``--seed`` after these.
    """
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
    return tr


def add_prune_run_args(p: argparse.ArgumentParser, *, out_help: str, ckpt_help: str) -> argparse._ArgumentGroup:
    """The "data and run" group of the pruning commands: preprocessing, limits, output/resume and runtime."""
    d = p.add_argument_group("data and run")
    add_preprocess_args(d)
    add_limit_args(d, limit_help="use the first N training images per class")
    d.add_argument("--out", required=True, help=out_help)
    d.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    d.add_argument("--ckpt-every", type=int, default=200, help=ckpt_help)
    d.add_argument("--log-every", type=int, default=50)
    d.add_argument("--workers", type=int, default=0)
    d.add_argument("--device", default="auto", help="cpu, cuda or auto")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    return d


def pruner_train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The pruner keywords of the options added by :func:`add_distill_train_args` and :func:`add_prune_run_args`
    (and ``--seed``): output/resume, optimizer, distillation, image size, checkpoints, logging and progress."""
    return {
        "out_dir": args.out,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "min_lr": args.min_lr,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip,
        "amp": args.amp,
        "distill_alpha": args.distill_alpha,
        "distill_temperature": args.distill_temperature,
        "label_smoothing": args.label_smoothing,
        "img_size": args.img_size,
        "seed": args.seed,
        "ckpt_every": args.ckpt_every,
        "log_every": args.log_every,
        "progress": not args.no_progress,
    }


# ------------------------------------------------------------------------------------------- runtime


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` (None: torch's choice); a non-positive count is an error."""
    if threads is not None:
        if threads <= 0:
            raise VitPruneError(f"--threads must be positive, got {threads}")
        torch.set_num_threads(threads)


def check_threads_and_batch(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and check that ``--batch-size`` is positive (before anything is read)."""
    set_threads(args.threads)
    if args.batch_size <= 0:
        raise VitPruneError(f"--batch-size must be positive, got {args.batch_size}")


def check_batch_multiple(batch_size: int) -> None:
    """``--batch-size`` is global: it must split evenly over the distributed processes."""
    from vitprune.training import distributed as D

    if batch_size % D.world_size():
        raise VitPruneError(f"--batch-size {batch_size} must be a multiple of the {D.world_size()} processes")


def load_teacher(args: argparse.Namespace, model: ViT) -> ViT | None:
    """The ``--teacher`` model (None without one); it must have as many classes as ``model``."""
    from vitprune.models.checkpoints import load_model

    teacher = load_model(args.teacher, preset=args.arch_preset) if args.teacher else None
    if teacher is not None and teacher.config.num_classes != model.config.num_classes:
        raise VitPruneError(
            f"teacher has {teacher.config.num_classes} classes but the model has {model.config.num_classes}"
        )
    return teacher


# ---------------------------------------------------------------------------------------------- data


def train_transform_for(
    ev: EvalTransform, *, scale: tuple[float, float], hflip: float, randaugment: str = "none"
) -> Compose:
    """The training transform matching the evaluation transform ``ev`` (size, normalisation, interpolation)."""
    from vitprune.training.augment import build_train_transform

    interp = ev.interpolation if ev.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    return build_train_transform(
        ev.img_size, ev.mean, ev.std, scale=scale, hflip=hflip, randaugment=randaugment, interpolation=interp
    )


def load_train_set(args: argparse.Namespace, model: ViT, transform: Callable) -> ImageFolderDataset:
    """``--data`` (with ``--classes``, ``--limit-per-class``); it may not have more classes than the model."""
    from vitprune.data.imagefolder import ImageFolderDataset

    train_set = ImageFolderDataset(args.data, transform, args.classes, args.limit_per_class)
    if train_set.num_classes > model.config.num_classes:
        raise VitPruneError(f"{args.data} has {train_set.num_classes} classes, the model {model.config.num_classes}")
    return train_set


def eval_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """An in-order loader; under torchrun each rank sees its own shard exactly once."""
    from vitprune.data.imagefolder import make_loader
    from vitprune.training import distributed as D

    return make_loader(dataset, batch_size, workers=workers, shuffle=False, distributed=D.is_distributed())


def val_eval_fn(args: argparse.Namespace, ev: EvalTransform, device: torch.device) -> EvalFn | None:
    """``model -> metrics`` on ``--val`` (``--val-limit-per-class``, ``--eval-batch-size``); None without it."""
    if not args.val:
        return None
    from vitprune.data.imagefolder import ImageFolderDataset
    from vitprune.metrics.evaluate import evaluate

    val_set = ImageFolderDataset(args.val, ev, args.classes, args.val_limit_per_class)
    val_loader = eval_loader(val_set, args.eval_batch_size, args.workers)
    return lambda m: evaluate(m, val_loader, device=device, progress=False)


def build_image_loaders(
    args: argparse.Namespace, model: ViT, device: torch.device, train_transform: Callable, ev: EvalTransform
) -> tuple[DataLoader, EvalFn | None]:
    """The shuffled training loader of per-process batches (``--batch-size`` / world size, last partial batch
    dropped, ``--seed``) and the ``--val`` evaluation function (None without ``--val``)."""
    from vitprune.data.imagefolder import make_loader
    from vitprune.training import distributed as D

    train_set = load_train_set(args, model, train_transform)
    loader = make_loader(
        train_set,
        args.batch_size // D.world_size(),
        workers=args.workers,
        shuffle=True,
        distributed=D.is_distributed(),
        drop_last=True,
        seed=args.seed,
    )
    return loader, val_eval_fn(args, ev, device)


# ----------------------------------------------------------------------------------------------- run


def run_info(args: argparse.Namespace, load_start: Any, t0: float, **extra: Any) -> dict[str, Any]:
    """The ``run`` record of a report: command, inputs (``extra`` after ``val``), machine, load, date, wall time."""
    from vitprune.training import distributed as D
    from vitprune.training.runinfo import command_line, loadavg, machine_info, utc_now

    return {
        "command": command_line(),
        "model": str(args.model),
        "data": str(args.data),
        "val": str(args.val) if args.val else None,
        **extra,
        "machine": machine_info(),
        "world_size": D.world_size(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "date": utc_now(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def finish_report(out_dir: Path, report: dict[str, Any], print_summary: Callable[[], None]) -> int:
    """Rank 0 writes ``out_dir/report.json`` and prints the summary; all ranks then meet at a barrier."""
    from vitprune.training import distributed as D

    if D.rank() == 0:
        from vitprune.reports import write_json_report

        write_json_report(out_dir / "report.json", report)
        print_summary()
    D.barrier()
    return 0


def top1_change(report: dict[str, Any]) -> str:
    """``"; top-1 DENSE % -> PRUNED %"`` when the report has a pruned evaluation, else ``""``."""
    pruned = report["pruned"]
    if "eval" not in pruned:
        return ""
    dense = report["dense"].get("eval", {})
    return f"; top-1 {dense.get('top1', float('nan')):.2f} % -> {pruned['eval']['top1']:.2f} %"
