"""Mixed-precision INT8 (#15): which layers to keep in fp32 so that dynamic INT8 stays within 1 point, at what speed.

ONNX Runtime dynamic INT8 (:func:`vitprune.export.quantize.quantize_onnx`, per-channel weights; the patch
embedding and head stay fp32 as by default) loses ~2 points on the shared ViT-Tiny. This scan chooses, ON THE
TUNING SPLIT (the first ``--tune-per-class`` training images of every class, never val), extra layers to keep in
fp32:

1. per kind over all blocks (qkv, the attention score/value products, proj, fc1, fc2): the tuning top-1 with that
   kind in fp32;
2. per block within the ``--refine`` kinds that helped most: the gain of keeping one block's layer in fp32;
3. greedy: add the layers with the largest gains, one at a time (re-measured), until the tuning top-1 is within
   ``--within`` points of fp32's, or ``--max-layers`` are kept.

Then the chosen configuration, plain dynamic INT8 and fp32 are evaluated on the full val set and timed round-robin
in one ONNX Runtime process (batch 1 and 32, ``--threads``). Resumable: every measured configuration is cached in
``--work``/scan.json.

    python benchmarks/int8_mixed.py                                           # dense ViT-Tiny (~25 min)
    python benchmarks/int8_mixed.py --tune-per-class 1 --val-per-class 1 --refine 1 --max-layers 1 \\
        --runs 2 --work /tmp/int8s --name int8_mixed_smoke                        # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, cached_batches, loadavg, markdown_table, shared_data, shared_model, write_results
from _recovery import split_train
from torch.utils.data import Subset

from vitprune.data import ImageFolderDataset, build_eval_transform
from vitprune.errors import VitPruneError
from vitprune.export.onnx import export_onnx
from vitprune.export.quantize import DEFAULT_EXCLUDE, quantize_onnx
from vitprune.metrics import evaluate
from vitprune.metrics.latency import compare_many
from vitprune.models.checkpoints import load_model
from vitprune.runtime.ort import OrtModel
from vitprune.utils.fs import atomic_write_text

KINDS = {"qkv": "attn/qkv/*", "attention": "attn/MatMul*", "proj": "attn/proj/*", "fc1": "mlp/fc1/*",
         "fc2": "mlp/fc2/*"}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--tune-per-class", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=25)
    ap.add_argument("--refine", type=int, default=2, help="kinds refined per block")
    ap.add_argument("--within", type=float, default=1.0, help="points of fp32 top-1 (tuning) to reach")
    ap.add_argument("--max-layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", default=str(REPO / "runs" / "int8_mixed"))
    ap.add_argument("--name", default="int8_mixed")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load_start = time.perf_counter(), loadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "scan.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    model = load_model(args.model).eval()
    depth = len(model.config.blocks)
    classes = shared_model() / "classes.txt"
    train = ImageFolderDataset(shared_data() / "train", build_eval_transform("shared"), classes)
    tune = cached_batches(Subset(train, split_train(train.samples, args.tune_per_class)[0]), 50)
    fp32 = work / "model.fp32.onnx"
    if not fp32.is_file():
        export_onnx(model, fp32)

    def onnx_for(keep: tuple[str, ...]) -> Path:
        path = work / f"dyn_{hashlib.sha1(','.join(keep).encode()).hexdigest()[:12]}.onnx"
        if not path.is_file():
            quantize_onnx(fp32, path, "dynamic", exclude=DEFAULT_EXCLUDE["dynamic"] + keep, overwrite=True)
        return path

    def top1(keep: tuple[str, ...] | None, split: str = "tune", batches=None) -> float:
        key = f"{split}:" + ("fp32" if keep is None else ",".join(keep))
        if key not in cache:
            path = fp32 if keep is None else onnx_for(keep)
            cache[key] = float(evaluate(OrtModel(path, threads=args.threads), batches or tune, progress=False)["top1"])
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n", overwrite=True)
            print(f"{key}: {cache[key]:.2f}", flush=True)
        return cache[key]

    ref, base = top1(None), top1(())
    kind_gain = {k: top1((f"*/{p}",)) - base for k, p in KINDS.items()}
    layers = []
    for kind in sorted(kind_gain, key=kind_gain.get, reverse=True)[: args.refine]:
        layers += [(f"/blocks.{b}/{KINDS[kind]}", kind, b) for b in range(depth)]
    layer_gain = {pat: top1((pat,)) - base for pat, _, _ in layers}
    chosen: list[str] = []
    trace = [{"kept_fp32": [], "top1_tune": base}]
    for pat in sorted(layer_gain, key=layer_gain.get, reverse=True):
        if ref - trace[-1]["top1_tune"] <= args.within or len(chosen) >= args.max_layers:
            break
        acc = top1((*chosen, pat))
        if acc > trace[-1]["top1_tune"]:  # keep a layer only if it helps once the others are kept too
            chosen.append(pat)
            trace.append({"kept_fp32": list(chosen), "top1_tune": acc})
    val_ds = ImageFolderDataset(shared_data() / "val", build_eval_transform("shared"), classes, args.val_per_class)
    val = cached_batches(val_ds, 50)
    configs = {"fp32": None, "dynamic": (), "dynamic mixed": tuple(chosen)}
    rows: dict[str, dict[str, Any]] = {}
    for name, keep in configs.items():
        path = fp32 if keep is None else onnx_for(keep)
        rows[name] = {"kept_fp32": None if keep is None else list(DEFAULT_EXCLUDE["dynamic"] + keep),
                      "top1_tune": top1(keep), "top1_val": top1(keep, "val", val), "file_bytes": path.stat().st_size,
                      "path": path}  # fmt: skip
    latency = {}
    for bs in (1, 32):
        runners = {n: OrtModel(r["path"], threads=args.threads) for n, r in rows.items()}
        res = compare_many(runners, batch_size=bs, threads=args.threads, warmup=3, runs=args.runs, baseline="fp32")
        latency[bs] = {n: {"median_ms": s["median_ms"], "speedup": s["speedup"]} for n, s in res["models"].items()}
        print(f"b{bs}: " + ", ".join(f"{n} {s['median_ms']:.1f} ms" for n, s in latency[bs].items()), flush=True)
    for r in rows.values():
        r["path"] = str(r["path"])
    record = {
        "model": args.model,
        "tuning": f"train, first {args.tune_per_class} per class ({sum(len(y) for _, y in tune)} images)",
        "val_images": sum(len(y) for _, y in val),
        "kind_gain_tune": kind_gain,
        "layer_gain_tune": layer_gain,
        "greedy": trace,
        "chosen_fp32_layers": chosen,
        "rows": rows,
        "latency": {str(k): v for k, v in latency.items()},
        "settings": vars(args),
        "total_s": time.perf_counter() - t0,
        "loadavg": {"start": load_start, "end": loadavg()},
    }
    table = markdown_table(
        ["precision", "extra fp32 layers", "top-1 tuning", "top-1 val", "MiB", "b1 speed-up", "b32 speed-up"],
        [[n, ", ".join(r["kept_fp32"][len(DEFAULT_EXCLUDE["dynamic"]):]) if r["kept_fp32"] else "-",
          r["top1_tune"], r["top1_val"], r["file_bytes"] / 2**20, f"{latency[1][n]['speedup']:.2f}x",
          f"{latency[32][n]['speedup']:.2f}x"] for n, r in rows.items()],
    )  # fmt: skip
    gains = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(kind_gain.items(), key=lambda kv: -kv[1]))
    md = (
        "# Mixed-precision dynamic INT8 in ONNX Runtime, layers chosen on the tuning split\n\n"
        f"fp32 top-1 on the tuning split {ref:.2f}, all-INT8 (patch embedding and head fp32) {base:.2f}; gain of "
        f"keeping one kind in fp32 in every block: {gains}. Greedy choice (tuning split): "
        f"{', '.join(chosen) or 'nothing'}. Val: {record['val_images']} images (reported only). Latency: ONNX Runtime, "
        f"{args.threads} threads, round-robin in one process ({args.runs} rounds), speed-up vs fp32.\n\n" + table + "\n"
    )
    write_results(args.name, record, md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        sys.exit(f"error: {exc}")
