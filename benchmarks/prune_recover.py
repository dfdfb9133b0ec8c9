"""Prune the shared ViT-Tiny with any registered method, then recover it with the ONE shared recipe (#13, #14, #15).

One row = one method with its settings. The data are the same for every row:

- tuning split: the first ``--tune-per-class`` training images of every class (2,000 by default). Settings are
  chosen on it; it is never used for calibration or recovery;
- calibration pool: ``--calib-images`` other training images (a seeded permutation, the same images for every
  method; a method that re-scores cycles over this pool; reconstruction draws from it);
- recovery: :func:`_recovery.recover` (distillation from the dense model, augmented training images without the
  tuning split, budget ``--recover`` images; recipe keys from ``--recovery``);
- reported: the full validation set (``--val-per-class 25``: 5,000 images) with a 95 % interval.

Resumable stage by stage under ``--work/<name>``: the one-shot model (``oneshot/``), each recovery (an engine run
directory that resumes from its checkpoint), each evaluation (``state.json``); a stopped run loses at most the
steps since the last checkpoint. Results: ``benchmarks/results/prune_recover_<name>.json`` / ``.md``.

    python benchmarks/prune_recover.py --name nvit50 --method nvit --set target_macs=0.5 \\
        --set reconstruct=sequential --set reconstruct_images=1024 --set reconstruct_damping=1e-2 --recover 15360
    python benchmarks/prune_recover.py --name nvit50_fd --oneshot-of nvit50 --recovery feature_weight=1.0
    python benchmarks/prune_recover.py --name smoke --method l2 --set target_macs=0.7 --calib-images 64 \\
        --tune-per-class 1 --val-per-class 1 --recover 128 --work /tmp/pr                     # smoke (minutes)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import REPO, cached_batches, ci95, loadavg, markdown_table, shared_data, shared_model, write_results
from _recovery import RECOVERY_KEYS, build_train_loader, recover, split_train
from torch.utils.data import Subset

from vitprune import pruners
from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.errors import VitPruneError
from vitprune.metrics.evaluate import evaluate
from vitprune.metrics.flops import count_macs, count_params
from vitprune.models import load, save
from vitprune.models.checkpoints import load_model
from vitprune.pruners.base import PruneData
from vitprune.pruners.settings import parse_text
from vitprune.training.engine import CHECKPOINT_NAME
from vitprune.training.masks import WeightMasks
from vitprune.utils.fs import atomic_write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="row name: work dir and results file")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--method", choices=pruners.available(), help="registered pruning method")
    src.add_argument("--oneshot-of", metavar="NAME", help="reuse the one-shot model of row NAME (other recovery)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method setting (CLI syntax)")
    ap.add_argument("--recovery", action="append", default=[], metavar="KEY=VALUE", help="recovery recipe key")
    ap.add_argument("--recover", type=int, nargs="*", default=[15360], help="recovery budgets in images (0: none)")
    ap.add_argument("--recover-seed", type=int, default=0, help="seed of the recovery data order")
    ap.add_argument("--tune-per-class", type=int, default=10)
    ap.add_argument("--calib-images", type=int, default=2560)
    ap.add_argument("--calib-batch-size", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=25, help="val images per class (25: all 5,000)")
    ap.add_argument("--batch-size", type=int, default=64, help="recovery batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration pool and the method")
    ap.add_argument("--work", default=str(REPO / "runs" / "bench"), help="where rows keep their stages")
    ap.add_argument("--label", default=None, help="how tables name the row (default: the method's label)")
    ap.add_argument("--chosen-on", default="defaults", help="which split chose the non-default settings")
    return ap.parse_args(argv)


def key_values(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise VitPruneError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def recovery_recipe(items: list[str]) -> dict[str, Any]:
    recipe: dict[str, Any] = {}
    for key, text in key_values(items, "--recovery").items():
        if key not in RECOVERY_KEYS:
            raise VitPruneError(f"unknown recovery key {key!r} (known: {', '.join(RECOVERY_KEYS)})")
        try:
            recipe[key] = json.loads(text)
        except json.JSONDecodeError:
            recipe[key] = text
    return recipe


def endless(ds, batch_size: int, seed: int) -> Iterator:
    """The calibration pool, reshuffled every pass (every method cycles over the same images)."""
    epoch = 0
    while True:
        yield from make_loader(ds, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


class Row:
    """The stages of one row under ``work/<name>`` and what they measured (``state.json``)."""

    def __init__(self, work: Path, name: str, create: bool = True) -> None:
        self.dir = work / name
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.oneshot_dir = self.dir / "oneshot"
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2, default=str) + "\n", overwrite=True)

    def save_oneshot(self, model) -> None:
        if self.oneshot_dir.exists():
            shutil.rmtree(self.oneshot_dir)  # a half-written model of an interrupted run
        save(model, self.oneshot_dir)


def evaluate_on(model, splits: dict[str, list], record: dict[str, Any]) -> None:
    """Top-1 on every split not yet measured (the tuning split chooses, val reports)."""
    for split, batches in splits.items():
        if f"top1_{split}" not in record:
            n = sum(len(y) for _, y in batches)
            top1 = float(evaluate(model, batches, progress=False)["top1"])
            record[f"top1_{split}"], record[f"ci95_{split}"], record[f"n_{split}"] = top1, ci95(top1, n), n
            print(f"  top-1 {split}: {top1:.2f} +- {record[f'ci95_{split}']:.2f} ({n} images)", flush=True)


def sparsity_masks(model) -> WeightMasks | None:
    """Masks that hold an unstructured model's zeros during recovery (None for dense / structural weights)."""
    masks = {n: (p != 0) for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")}
    if not masks or all(bool(m.all()) for m in masks.values()):
        return None
    return WeightMasks(masks)


@dataclass
class Shared:
    """What every row uses alike: the dense model, the splits, the calibration pool (see the module docstring)."""

    dense: Any
    train_ds: ImageFolderDataset
    tune_idx: list[int]
    calib_idx: list[int]
    splits: dict[str, list]
    tune_per_class: int
    seed: int
    dense_macs: int = 0
    dense_params: int = 0

    def calib(self, batch_size: int = 32) -> Iterator:
        return endless(Subset(self.train_ds, self.calib_idx), batch_size, self.seed)

    def train_loader(self, batch_size: int, seed: int):
        return build_train_loader(batch_size=batch_size, seed=seed, tune_per_class=self.tune_per_class)


def load_shared(tune_per_class: int, calib_images: int, val_per_class: int, seed: int) -> Shared:
    dense = load_model(str(shared_model() / "model.safetensors")).eval()
    classes = shared_model() / "classes.txt"
    train_ds = ImageFolderDataset(shared_data() / "train", build_eval_transform("shared"), classes)
    tune_idx, rest_idx = split_train(train_ds.samples, tune_per_class)
    gen = torch.Generator().manual_seed(seed)
    calib_idx = [rest_idx[i] for i in torch.randperm(len(rest_idx), generator=gen)[:calib_images].tolist()]
    val_ds = ImageFolderDataset(shared_data() / "val", build_eval_transform("shared"), classes, val_per_class)
    splits = {"tune": cached_batches(Subset(train_ds, tune_idx), 50), "val": cached_batches(val_ds, 50)}
    print(f"tuning {len(tune_idx)} train images, calibration {len(calib_idx)}, val {len(val_ds)}", flush=True)
    return Shared(dense, train_ds, tune_idx, calib_idx, splits, tune_per_class, seed,
                  count_macs(dense)["total"], count_params(dense))  # fmt: skip


def describe_oneshot(row: Row, shared: Shared) -> Any:
    """Load the row's one-shot model, record its size and shape, evaluate it once; returns the model."""
    oneshot = load(row.oneshot_dir).eval()
    rec = row.state.setdefault("oneshot", {"saved": True})
    rec |= {"macs_fraction": count_macs(oneshot)["total"] / shared.dense_macs, "params": count_params(oneshot)}
    rec["params_fraction"] = rec["params"] / shared.dense_params
    rec["blocks"] = [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in oneshot.config.blocks]
    rec["embed_dim"] = oneshot.config.embed_dim
    evaluate_on(oneshot, shared.splits, rec)
    row.save()
    return oneshot


def recover_row(row: Row, shared: Shared, budget: int, recipe: dict[str, Any], batch_size: int, seed: int) -> dict:
    """Recover the row's one-shot model with ``budget`` images (resumable) and evaluate it; returns the record."""
    rec = row.state.setdefault("recovered", {}).setdefault(f"{budget}" + (f"_seed{seed}" if seed else ""), {})
    run_dir = row.dir / f"recover_{budget}_seed{seed}"
    if not rec.get("done"):
        student = load(row.oneshot_dir)
        print(f"  recovering {budget} images (recipe {recipe or 'default'}, seed {seed})", flush=True)
        rec["recovery"] = recover(
            student, shared.dense, shared.train_loader(batch_size, seed), budget, masks=sparsity_masks(student),
            out_dir=run_dir, seed=seed, resume=(run_dir / CHECKPOINT_NAME).is_file(), **recipe,
        )  # fmt: skip
        rec |= {"done": True, "budget": budget, "seed": seed}
        row.save()
    evaluate_on(load(run_dir / "model").eval(), shared.splits, rec)
    row.save()
    return rec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), loadavg()
    work = Path(args.work)
    recipe = recovery_recipe(args.recovery)  # every input checked before any file is written or data is read
    pruner = settings = None
    if args.oneshot_of:
        source = Row(work, args.oneshot_of, create=False)
        if not source.state.get("oneshot", {}).get("saved"):
            raise VitPruneError(f"row {args.oneshot_of} has no one-shot model in {source.oneshot_dir}")
    else:
        cls = pruners.get(args.method)
        settings = {k: parse_text(cls.Config, k, v) for k, v in key_values(args.set, "--set").items()}
        pruner = cls(**settings, progress=False, seed=args.seed)
    row = Row(work, args.name)
    shared = load_shared(args.tune_per_class, args.calib_images, args.val_per_class, args.seed)
    evaluate_on(shared.dense, shared.splits, row.state.setdefault("dense", {}))
    row.save()
    if args.oneshot_of:
        row.oneshot_dir = source.oneshot_dir
        row.state |= {"oneshot_of": args.oneshot_of, "method": source.state.get("method")}
        row.state |= {"settings": source.state.get("settings")}
    elif not row.state.get("oneshot", {}).get("saved"):
        t0 = time.perf_counter()
        res = pruner.prune(shared.dense, PruneData(shared.calib(args.calib_batch_size),
                                                   shared.train_loader(args.batch_size, args.seed)),
                           teacher=shared.dense)  # fmt: skip
        results = res if isinstance(res, list) else [res]
        if len(results) != 1:
            raise VitPruneError(f"{args.method} gave {len(results)} models: give one target per row")
        row.save_oneshot(results[0].model)
        row.state.update(method=args.method, settings={k: str(v) for k, v in settings.items()})
        row.state["config"] = pruner.config.to_dict()
        row.state["oneshot"] = {"saved": True, "prune_s": time.perf_counter() - t0}
        row.state["prune_report"] = results[0].report
        row.save()
    describe_oneshot(row, shared)
    print(f"{args.name}: one-shot {row.state['oneshot']['macs_fraction']:.3f} MACs", flush=True)
    for budget in [b for b in args.recover if b > 0]:
        recover_row(row, shared, budget, recipe, args.batch_size, args.recover_seed)
    n_tune, n_calib = len(shared.tune_idx), len(shared.calib_idx)
    write_row_results(args, row, recipe, n_tune, n_calib, time.perf_counter() - t_start, load_start)
    return 0


def write_row_results(args, row: Row, recipe, n_tune: int, n_calib: int, total_s: float, load_start) -> None:
    s = row.state
    label = args.label or (pruners.REGISTRY[s["method"]][1] if s.get("method") in pruners.REGISTRY else s["method"])
    record = {
        "benchmark": "prune_recover",
        "name": args.name,
        "label": label,
        "method": s.get("method"),
        "settings": s.get("settings"),
        "oneshot_of": s.get("oneshot_of"),
        "chosen_on": args.chosen_on,
        "recovery_recipe": recipe,
        "data": {
            "tuning": f"train, first {args.tune_per_class} files per class ({n_tune} images): chooses settings",
            "calibration": f"{n_calib} other train images (seeded permutation, seed {args.seed})",
            "recovery": "train minus the tuning split, augmented (benchmarks/_recovery.py)",
            "reported": f"val, first {args.val_per_class} per class",
        },
        "state": s,
        "total_s_this_invocation": total_s,
        "loadavg": {"start": load_start, "end": loadavg()},
    }
    rows = [["dense", "", s["dense"]["top1_tune"], f"{s['dense']['top1_val']:.2f} +- {s['dense']['ci95_val']:.2f}",
             "1.000", ""]]  # fmt: skip
    o = s["oneshot"]
    rows.append([f"{label} one-shot", 0, o["top1_tune"], f"{o['top1_val']:.2f} +- {o['ci95_val']:.2f}",
                 f"{o['macs_fraction']:.3f}", f"{s['oneshot'].get('prune_s', 0):.0f}"])  # fmt: skip
    for key, rec in sorted(s.get("recovered", {}).items(), key=lambda kv: tuple(map(int, kv[0].split("_seed")))):
        if "top1_val" in rec:
            r = rec["recovery"]
            budget = key.replace("_seed", " (seed ") + (")" if "_seed" in key else "")
            rows.append([f"{label} recovered", budget, rec["top1_tune"],
                         f"{rec['top1_val']:.2f} +- {rec['ci95_val']:.2f}", f"{o['macs_fraction']:.3f}",
                         f"{60 * r['minutes']:.0f} ({r['images_per_s']:.1f} img/s)"])  # fmt: skip
    table = markdown_table(["model", "recovery images", "top-1 tuning", "top-1 val +- 95 % CI", "MACs", "time s"], rows)
    md = (
        f"# {label}: prune + shared recovery ({args.name})\n\n"
        f"Settings: `{s.get('settings')}`"
        + (f" (one-shot model of row {s['oneshot_of']})" if s.get("oneshot_of") else "")
        + f"; recovery recipe: `{recipe or 'benchmarks/_recovery.py defaults'}`; non-default settings chosen on: "
        f"{args.chosen_on}. Tuning split: {n_tune} training images never used for calibration or recovery; "
        f"calibration: {n_calib} other training images; val: reported, 95 % normal-approximation interval.\n\n"
        + table + "\n"
    )  # fmt: skip
    write_results(f"prune_recover_{args.name}", record, md)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        sys.exit(f"error: {exc}")
