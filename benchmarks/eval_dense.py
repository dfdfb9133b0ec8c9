"""Dense top-1 of the shared ViT-Tiny on Tiny-ImageNet val (5,000 images), "shared" preprocessing.

The shared README states 69.46 % for this model and preprocessing; this script checks we reproduce it.

    python benchmarks/eval_dense.py --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from _common import markdown_table, shared_data, shared_model, write_results

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics import evaluate
from vitprune.models.checkpoints import load_model

EXPECTED_TOP1 = 69.46


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--data", default=str(shared_data() / "val"))
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument("--name", default="eval_dense", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    ds = ImageFolderDataset(args.data, build_eval_transform("shared"), args.classes, args.limit_per_class)
    loader = make_loader(ds, args.batch_size, workers=args.workers)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    res = evaluate(model, loader, progress=sys.stderr.isatty())
    wall = time.perf_counter() - start
    record = {
        "model": args.model,
        "data": args.data,
        "preprocess": repr(ds.transform),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "top1": res["top1"],
        "top5": res["top5"],
        "loss": res["loss"],
        "n": res["n"],
        "wall_s": wall,
        "images_per_s": res["n"] / wall,
        "loadavg_1m_before": load_before,
        "expected_top1": EXPECTED_TOP1,
        "within_0.1": abs(res["top1"] - EXPECTED_TOP1) <= 0.1 if res["n"] == 5000 else None,
    }
    table = markdown_table(
        ["model", "n", "top-1 %", "top-5 %", "loss", "images/s", "wall s"],
        [["ViT-Tiny (shared, dense)", res["n"], res["top1"], res["top5"], res["loss"], record["images_per_s"], wall]],
    )
    md = f"# Dense evaluation: shared ViT-Tiny on Tiny-ImageNet val\n\n{table}\n\nExpected top-1 {EXPECTED_TOP1} %.\n"
    path = write_results(args.name, record, md)
    print(f"top1 {res['top1']:.2f}  top5 {res['top5']:.2f}  n {res['n']}  {record['images_per_s']:.1f} img/s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
