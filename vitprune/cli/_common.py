"""Pieces shared by the training CLI commands (``prune nvit``, ``prune vtp``, ``finetune``): option blocks,
ImageFolder datasets and loaders built from the model's preprocessing, the teacher, and the run record.

Heavy imports stay inside the functions so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vitprune.errors import VitPruneError

CLASSES_FILE = "classes.txt"  # next to a checkpoint: line i names output i

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
    """``--preset`` (architecture), ``--preprocess`` and ``--img-size``: how the model is read and its images
    prepared (the same two flag names in every command)."""
    g.add_argument("--preset", default=None, help="architecture for a checkpoint that does not record it (timm name)")
    g.add_argument("--preprocess", default="shared", help="preprocessing preset when the model records none")
    g.add_argument("--img-size", type=int, default=None)


def add_crop_scale_arg(g: argparse._ActionsContainer) -> None:
    """``--crop-scale LO,HI``: the RandomResizedCrop area range of the training transform."""
    g.add_argument("--crop-scale", type=parse_pair, default=(0.35, 1.0), help="RandomResizedCrop area range LO,HI")


def add_limit_args(g: argparse._ActionsContainer, *, limit_help: str | None) -> None:
    """``--limit-per-class``, ``--val-limit-per-class`` and ``--eval-batch-size``."""
    g.add_argument("--limit-per-class", type=int, default=None, help=limit_help)
    g.add_argument("--val-limit-per-class", type=int, default=None)
    g.add_argument("--eval-batch-size", type=int, default=64)


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

    teacher = load_model(args.teacher, preset=args.preset) if args.teacher else None
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


def classes_file(model_path: str | os.PathLike, explicit: str | None) -> str | None:
    """``--classes``, else a ``classes.txt`` next to the model (line i names output i), else None (the folders'
    sorted order): a checkpoint shipped with its class list is never trained or evaluated in another order."""
    if explicit:
        return explicit
    p = Path(model_path)
    candidate = (p if p.is_dir() else p.parent) / CLASSES_FILE
    return str(candidate) if candidate.is_file() else None


def load_train_set(args: argparse.Namespace, model: ViT, transform: Callable) -> ImageFolderDataset:
    """``--data`` (with ``--classes``, ``--limit-per-class``); it may not have more classes than the model."""
    from vitprune.data.imagefolder import ImageFolderDataset

    train_set = ImageFolderDataset(args.data, transform, args.classes, args.limit_per_class)
    if train_set.num_classes > model.config.num_classes:
        raise VitPruneError(f"{train_set.class_count_text()} but the model has {model.config.num_classes} classes")
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
    from vitprune.training.runinfo import command_line, git_commit, loadavg, machine_info, utc_now

    return {
        "command": command_line(),
        "model": str(args.model),
        "data": str(args.data),
        "val": str(args.val) if args.val else None,
        **extra,
        "machine": machine_info(),
        "git_commit": git_commit(Path(__file__).resolve().parents[1]),  # "unknown" outside a checkout
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
