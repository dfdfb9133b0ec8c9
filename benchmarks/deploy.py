"""Deployable speed: dense and pruned ViTs in fp32 and INT8 (dynamic, static QDQ), run in ONNX Runtime.

For every model given (the first is the baseline; ``--sparse`` marks unstructured-sparse ones such as OBS models)
and every precision in ``--precisions``: export to ONNX (fp32), quantize (``vitprune.export.quantize``), top-1 on a
val folder through ONNX Runtime, file size (also compressed: deflate, bitmask + INT8 values) and, for sparse
models, whether every zero weight stayed an exact zero in INT8. Then ORT latency of all rows side by side,
round-robin in this one process, at each ``--batch-sizes`` with ``--threads`` intra-op threads.

Resumable: rows (model, precision) already in ``benchmarks/results/<name>.json`` are skipped, and so is a batch
size whose latency was measured over the same rows; the ONNX files are kept in ``--work``.

    python benchmarks/deploy.py --models dense=SHARED nvit50=runs/nvit50/model --sparse obs70=runs/obs/0.70/model
    python benchmarks/deploy.py --val-limit-per-class 1 --calib-images 16 --runs 3 --name deploy_smoke   # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime
import torch
from _common import RESULTS, cached_batches, loadavg, markdown_table, shared_data, shared_model, write_results

from vitprune.data import ImageFolderDataset
from vitprune.data.transforms import eval_transform_for
from vitprune.export.onnx import export_onnx
from vitprune.export.quantize import calibration_batches, deflate_bytes, quantize_onnx
from vitprune.metrics import evaluate
from vitprune.metrics.latency import compare_many
from vitprune.models.checkpoints import load_model
from vitprune.runtime.ort import OrtModel
from vitprune.training.runinfo import machine_info

PRECISIONS = ("fp32", "dynamic", "static")


def _named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {item!r}")
        out[name] = str(shared_model()) if path == "SHARED" else path
    return out


def _sparsity(model: torch.nn.Module) -> float:
    w = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    return float(sum(int((p == 0).sum()) for p in w) / max(sum(p.numel() for p in w), 1))


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dense=SHARED"], help="NAME=PATH (SHARED: the shared ViT-Tiny)")
    ap.add_argument("--sparse", nargs="*", default=[], help="NAME=PATH of unstructured-sparse (OBS) models")
    ap.add_argument("--val", default=str(shared_data() / "val"))
    ap.add_argument("--calib", default=str(shared_data() / "train"), help="calibration images (never val)")
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--val-limit-per-class", type=int, default=5, help="val images per class (5 -> 1,000)")
    ap.add_argument("--calib-images", type=int, default=256)
    ap.add_argument("--calib-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--keep-fp32", nargs="*", default=None, help="nodes left in fp32 (default: the mode's)")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the ONNX files (default: a folder in the temp dir)")
    ap.add_argument("--name", default="deploy")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where <name>.json / .md go (default results/)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    models = {**_named(args.models), **_named(args.sparse)}
    sparse = set(_named(args.sparse))
    work = Path(args.work or Path(tempfile.gettempdir()) / f"vitprune-{args.name}")
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.results_dir) / f"{args.name}.json"
    record = _load(out_json)
    rows: dict[str, dict[str, Any]] = record.get("rows", {})
    latency: dict[str, Any] = record.get("latency", {})
    settings = {
        "val": args.val,
        "val_limit_per_class": args.val_limit_per_class,
        "calib": args.calib,
        "calib_images": args.calib_images,
        "calib_method": args.calib_method,
        "keep_fp32": args.keep_fp32,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
    }
    if record and record.get("settings") != settings:
        raise SystemExit(f"{out_json} was written with other settings: use another --name (or delete it)")

    def save() -> None:
        record.update(
            settings=settings,
            models=models,
            rows=rows,
            latency=latency,
            machine=machine_info(),
            onnxruntime=onnxruntime.__version__,
            load_average={"start": load_start, "now": loadavg()},
        )
        record.pop("environment", None)  # refreshed by write_results: command, date, git commit
        write_results(args.name, record, _markdown(rows, latency, args), Path(args.results_dir))

    batches = None
    for name, path in models.items():
        todo = [p for p in args.precisions if f"{name}/{p}" not in rows]
        if not todo:
            continue
        model = load_model(path)
        transform = eval_transform_for(model.config.preprocess, default="shared", img_size=model.config.img_size)
        if batches is None:
            val = ImageFolderDataset(args.val, transform, args.classes, args.val_limit_per_class)
            batches = cached_batches(val, 50)
        fp32 = work / f"{name}.fp32.onnx"
        if not fp32.is_file():
            export_onnx(model, fp32)
        calib = None
        for prec in todo:
            t0 = time.perf_counter()
            onnx_file, info = fp32, {"fp32_file_bytes": fp32.stat().st_size}
            if prec != "fp32":
                if prec == "static" and calib is None:
                    calib = calibration_batches(args.calib, transform, args.calib_images)
                onnx_file = work / f"{name}.{prec}.onnx"
                info = quantize_onnx(
                    fp32,
                    onnx_file,
                    prec,
                    calib=calib if prec == "static" else None,
                    exclude=args.keep_fp32,
                    calib_method=args.calib_method,
                    overwrite=True,
                )
            res = evaluate(OrtModel(onnx_file, threads=args.threads), batches, progress=False)

            rows[f"{name}/{prec}"] = {
                "model": name,
                "path": path,
                "precision": prec,
                "sparse": name in sparse,
                "weight_sparsity": round(_sparsity(model), 4),
                "top1": res["top1"],
                "top5": res["top5"],
                "n": res["n"],
                "file_bytes": onnx_file.stat().st_size,
                "deflate_bytes": info.get("int8_deflate_bytes") or deflate_bytes(onnx_file),
                "bitmask_bytes": info.get("int8_bitmask_bytes"),
                "zeros_kept": info.get("zeros_kept"),
                "nodes_quantized": info.get("nodes_quantized"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            print(f"{name}/{prec}: top1 {res['top1']:.2f} % ({rows[f'{name}/{prec}']['wall_s']} s)", flush=True)
            save()
    keys = [f"{n}/{p}" for n in models for p in args.precisions]
    for bs in args.batch_sizes:
        if latency.get(f"b{bs}", {}).get("rows") == keys:
            continue
        files = {k: work / (f"{k.split('/')[0]}.{k.split('/')[1]}.onnx") for k in keys}
        runners = {k: OrtModel(f, threads=args.threads) for k, f in files.items()}
        res = compare_many(runners, batch_size=bs, threads=args.threads, warmup=args.warmup, runs=args.runs)
        latency[f"b{bs}"] = {
            "rows": keys,
            "baseline": res["baseline"],
            "models": {k: {m: v for m, v in s.items() if m != "times_ms"} for k, s in res["models"].items()},
        }
        print(f"latency b{bs}: " + ", ".join(f"{k} {s['median_ms']:.1f} ms" for k, s in res["models"].items()))
        save()
    save()
    print(f"-> {out_json}")
    return 0


def _kept(names: list[str] | None) -> str:
    return "the defaults of each mode" if names is None else ", ".join(names) or "none"


def _markdown(rows: dict[str, dict[str, Any]], latency: dict[str, Any], args: argparse.Namespace) -> str:
    mib = 2**20
    lat_cols = sorted(latency, key=lambda k: int(k[1:]))
    headers = ["model", "precision", "top-1 %", "MiB", "deflate MiB", "bitmask+int8 MiB", "zeros kept"]
    headers += [f"{b} ms / speed-up" for b in lat_cols]
    table = []
    for key, r in rows.items():
        cells = [
            r["model"] + (f" ({100 * r['weight_sparsity']:.0f} % sparse)" if r["sparse"] else ""),
            r["precision"],
            r["top1"],
            r["file_bytes"] / mib,
            r["deflate_bytes"] / mib,
            "-" if r["bitmask_bytes"] is None else f"{r['bitmask_bytes'] / mib:.2f}",
            "-" if r["zeros_kept"] is None else str(r["zeros_kept"]),
        ]
        for b in lat_cols:
            s = latency[b]["models"].get(key)
            cells.append("-" if s is None else f"{s['median_ms']:.1f} / {s['speedup']:.2f}x")
        table.append(cells)
    n = next(iter(rows.values()))["n"] if rows else 0
    return (
        "# Deployable speed: fp32 vs INT8 in ONNX Runtime\n\n"
        f"Top-1 on {n} val images ({args.val_limit_per_class} per class) through ONNX Runtime; INT8 static calibrated "
        f"on {args.calib_images} images of {args.calib} ({args.calib_method}); nodes kept in fp32: "
        f"{_kept(args.keep_fp32)}. Latency: ORT, {args.threads} threads, every row timed round-robin "
        f"in one process ({args.runs} rounds after {args.warmup} warm-up); speed-up vs the first row.\n\n"
        + markdown_table(headers, table)
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
