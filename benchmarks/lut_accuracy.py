"""How well does the latency lookup table predict the latency of pruned ViTs on this machine?

Builds a LUT (attention(emb, heads, qk, v) + mlp(emb, mlp) + stem(emb), see vitprune/latency/lut.py) for the
shared ViT-Tiny's shape on the CPU, then times the dense model and ``--archs`` random pruned architectures end to
end and compares with the LUT prediction (median / max relative error). The table is saved next to the results.

    python benchmarks/lut_accuracy.py --batch 8 --threads 1
    python benchmarks/lut_accuracy.py --runtime onnxruntime --batch 32 --threads 2 --name lut_accuracy_ort  # deploy
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import REPO, RESULTS, markdown_table, write_results

from vitprune.latency.lut import DEFAULT_GRID, RUNTIMES, LatencyTable, build_table, check_table, parse_grid
from vitprune.models.config import ViTConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=None, help="grid spec (default: the built-in ViT-Tiny grid)")
    ap.add_argument("--archs", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--check-runs", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="per-point timing statistic")
    ap.add_argument("--runtime", choices=RUNTIMES, default="torch", help="what the table times (and is checked in)")
    ap.add_argument("--no-calibrate", action="store_true", help="raw branch sums (no end-to-end scale)")
    ap.add_argument("--table", default=None, help="check this saved table instead of building one")
    ap.add_argument("--name", default="lut_accuracy")
    args = ap.parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    base = ViTConfig.uniform(192, 12, 3, num_classes=200)  # the shared ViT-Tiny's architecture
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    if args.table:
        table = LatencyTable.load(args.table)
        table.check_compatible("cpu", args.batch, "float32", args.threads, runtime=args.runtime)
        table_path = Path(args.table).resolve()
    else:
        table = build_table(
            "cpu",
            args.batch,
            "float32",
            args.threads,
            grid,
            num_classes=200,
            runs=args.runs,
            progress=sys.stderr.isatty(),
            stat=args.stat,
            runtime=args.runtime,
            calibrate=None if args.no_calibrate else base,
        )
        table_path = table.save(RESULTS / f"{args.name}_table.json", overwrite=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = check_table(table, base, args.archs, "cpu", args.seed, runs=args.check_runs, progress=sys.stderr.isatty())
    t_check = time.perf_counter() - t0
    rows = []
    for i, r in enumerate(result["archs"]):
        dims = r["blocks"]
        desc = "dense ViT-Tiny" if i == 0 else f"random {i}: emb {r['embed_dim']}, {sum(d[0] for d in dims)} heads"
        ratios = [r.get("predicted_ratio", 1.0), r.get("measured_ratio", 1.0)]
        rows.append([desc, r["predicted_ms"], r["measured_ms"], round(100 * r["rel_error"], 1), *ratios])
    headers = ["architecture", "LUT predicted ms", "measured ms", "rel. error %", "pred. / dense", "meas. / dense"]
    table_md = markdown_table(headers, rows)
    record = {
        "runtime": table.runtime,
        "batch_size": args.batch,
        "threads": args.threads,
        "stat": table.meta.get("stat", "median"),
        "grid": table.grid,
        "grid_points": int(table.attn_ms.size + table.mlp_ms.size + table.stem_ms.size),
        "build_s": round(t_build, 1),
        "check_s": round(t_check, 1),
        "table": str(table_path.relative_to(REPO)) if table_path.is_relative_to(REPO) else str(table_path),
        "scale": table.scale,
        "calibration": table.meta.get("calibration"),
        "median_rel_error": result["median_rel_error"],
        "median_rel_error_random": statistics.median(r["rel_error"] for r in result["archs"][1:]),
        "max_rel_error": result["max_rel_error"],
        "median_ratio_error": result["median_ratio_error"],
        "max_ratio_error": result["max_ratio_error"],
        "archs": result["archs"],
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    md = (
        f"# Latency LUT accuracy (CPU, {table.runtime})\n\n"
        f"Table: {record['grid_points']} timed points (attention 4-D, MLP 2-D, stem 1-D), batch {args.batch}, "
        f"{args.threads} thread(s), per-point statistic {record['stat']}, built in {t_build:.0f} s. "
        "Relative error of the prediction "
        f"stem(emb) + sum_b [attn(emb, h, qk, v) + mlp(emb, m)] against end-to-end timings: median "
        f"{100 * result['median_rel_error']:.1f} %, max {100 * result['max_rel_error']:.1f} % (random architectures "
        f"only, the dense one excluded: median {100 * record['median_rel_error_random']:.1f} %); table scale "
        f"x{table.scale:.3f} (end-to-end calibration on the dense architecture"
        + ("" if table.scale != 1.0 else ": none")
        + "); of the latency relative "
        f"to the dense model (what a latency-fraction target uses): median {100 * result['median_ratio_error']:.1f} %, "
        f"max {100 * result['max_ratio_error']:.1f} %.\n\n{table_md}\n\n"
        f"Load average at start/end: {load_start} / {record['loadavg_end']} (other processes share this machine).\n"
    )
    path = write_results(args.name, record, md)
    print(table_md)
    print(
        f"median rel error {100 * result['median_rel_error']:.1f} %, "
        f"max {100 * result['max_rel_error']:.1f} % -> {path}"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
