"""Does a model's measured PyTorch-eager latency ratio depend on the process that times it? (#13, session 6)

Two protocols on the same saved models (rows of a :mod:`matched_latency` work dir), batch 32:

- ``many``: every row's model and the dense one loaded in THIS process, timed round-robin
  (:func:`vitprune.metrics.latency.compare_many`) - what the first matched-latency stage did;
- ``fresh``: each model alone with the dense one in a new process (:mod:`latency_probe`), ``--repeats`` times.

    python benchmarks/latency_protocols.py --work runs/matched --rows nvit@0.5 tp-l2-global@0.5 vtp@0.7
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _common import markdown_table, shared_model, write_results
from latency_probe import probe

from vitprune.errors import VitPruneError
from vitprune.metrics.latency import compare_many
from vitprune.models import load
from vitprune.models.checkpoints import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a matched_latency work dir (rows with a oneshot/ model)")
    ap.add_argument("--rows", nargs="+", required=True, help="rows timed by both protocols")
    ap.add_argument("--repeats", type=int, default=2, help="fresh-process probes per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--name", default="latency_protocols")
    args = ap.parse_args(argv)
    work = Path(args.work)
    every = sorted(d.name for d in work.iterdir() if (d / "oneshot").is_dir()) if work.is_dir() else []
    missing = [r for r in args.rows if r not in every]
    if missing:
        raise VitPruneError(f"no saved one-shot model for rows {', '.join(missing)} under {work}")
    torch.set_num_threads(args.threads)
    runners = {"dense": load_model(str(shared_model())).eval()} | {n: load(work / n / "oneshot").eval() for n in every}
    res = compare_many(runners, batch_size=32, threads=args.threads, warmup=2, runs=args.runs, baseline="dense")
    many = {n: 1.0 / res["models"][n]["speedup"] for n in every}
    ms = {n: res["models"][n]["median_ms"] for n in ["dense", *every]}
    del runners, res
    probes = {n: [probe(work / n / "oneshot", shared_model(), "torch", args.threads, args.runs)
                  for _ in range(args.repeats)] for n in args.rows}  # fmt: skip
    rows = [{"row": n, "many": many[n], "many_ms": {"model": ms[n], "dense": ms["dense"]},
             "fresh": [p["ratio"] for p in probes[n]], "fresh_median": statistics.median(p["ratio"] for p in probes[n]),
             "fresh_ms": [{"model": p["model_ms"], "dense": p["dense_ms"]} for p in probes[n]]}
            for n in args.rows]  # fmt: skip
    table = markdown_table(
        ["row", f"many ({len(every)} models in one process)", "fresh process, each probe", "fresh / many"],
        [[r["row"], f"{r['many']:.3f} ({r['many_ms']['model']:.0f} / {r['many_ms']['dense']:.0f} ms)",
          ", ".join(f"{x:.3f} ({m['model']:.0f} / {m['dense']:.0f} ms)" for x, m in zip(r["fresh"], r["fresh_ms"],
                                                                                   strict=True)),
          f"{r['fresh_median'] / r['many']:.2f}"] for r in rows],
    )  # fmt: skip
    md = (
        "# Latency ratio (model / dense, PyTorch eager, batch 32) by timing protocol\n\n"
        f"`many`: all {len(every)} saved models of `{work.name}` and the dense one round-robin in one process "
        f"({args.runs} rounds); `fresh`: the model alone with the dense one in a new process "
        f"(benchmarks/latency_probe.py, median of {args.runs} per-round ratios), {args.repeats} times. "
        "In brackets: model / dense median ms.\n\n" + table
    )
    write_results(args.name, {"rows": rows, "settings": vars(args), "models_in_process": every}, md)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        sys.exit(f"error: {exc}")
