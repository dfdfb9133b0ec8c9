"""Latency of one saved model / the dense one, timed round-robin in a FRESH process (the matched-latency probe).

Why a fresh process: a user runs one model in its process, so each probe loads only the dense model and the model
under test (no data, no other models, no allocator history) and times them round-robin
(:func:`vitprune.metrics.latency.compare_many`, batch 32) in PyTorch eager or ONNX Runtime; the ratio is the median
of the per-round ratios. What it does NOT remove (measured, session 6, benchmarks/results/latency_protocols.md): on
the shared 2-core VM most pruned models' times held (NViT 0.5x: 157-168 ms; VTP 0.7x moved 216 -> 258-308 ms), the
dense model's did not (296 ms in a long-lived matching process, 364-452 ms in fresh ones): repeat probes.

    python benchmarks/latency_probe.py runs/matched/nvit@0.5/oneshot --runtime onnxruntime    # prints one JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def time_pair(model_dir: str, dense_dir: str, runtime: str, threads: int, runs: int, batch: int) -> dict[str, Any]:
    """Load ``dense_dir`` and ``model_dir``, time them round-robin, return the model's latency ratio."""
    import torch

    from vitprune.metrics.latency import compare_many
    from vitprune.models import load
    from vitprune.models.checkpoints import load_model
    from vitprune.runtime.ort import module_session

    torch.set_num_threads(threads)
    dense, model = load_model(dense_dir).eval(), load(model_dir).eval()
    runners: dict[str, Any] = {"dense": dense, "model": model}
    if runtime == "onnxruntime":
        x = torch.randn(batch, 3, dense.config.img_size, dense.config.img_size)
        runners = {k: module_session(m, x, threads) for k, m in runners.items()}
    res = compare_many(runners, batch_size=batch, threads=threads, warmup=2, runs=runs, baseline="dense")
    stats = res["models"]
    # the median of the per-round ratios: a slow spell of the machine hits both models of a round alike
    rounds = sorted(m / d for m, d in zip(stats["model"]["times_ms"], stats["dense"]["times_ms"], strict=True))
    return {"ratio": statistics.median(rounds), "ratio_of_medians": 1.0 / stats["model"]["speedup"],
            "ratio_p10_p90": [rounds[len(rounds) // 10], rounds[-1 - len(rounds) // 10]],
            "model_ms": stats["model"]["median_ms"], "dense_ms": stats["dense"]["median_ms"], "runtime": runtime,
            "runs": runs, "batch_size": batch, "threads": threads}  # fmt: skip


def probe(model_dir: str | os.PathLike, dense_dir: str | os.PathLike, runtime: str = "torch", threads: int = 2,
          runs: int = 20, batch: int = 32) -> dict[str, Any]:  # fmt: skip
    """:func:`time_pair` in a new Python process (this file as a script); raises ``VitPruneError`` on failure."""
    from vitprune.errors import VitPruneError

    cmd = [sys.executable, str(Path(__file__).resolve()), str(model_dir), "--dense", str(dense_dir),
           "--runtime", runtime, "--threads", str(threads), "--runs", str(runs), "--batch", str(batch)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VitPruneError(f"latency probe of {model_dir} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a saved vitprune model directory")
    ap.add_argument("--dense", default=None, help="the dense model (default: the shared ViT-Tiny)")
    ap.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.dense is None:
        sys.path.insert(0, str(HERE))
        from _common import shared_model

        args.dense = str(shared_model())
    print(json.dumps(time_pair(args.model, args.dense, args.runtime, args.threads, args.runs, args.batch)))
    return 0


if __name__ == "__main__":
    from vitprune.errors import VitPruneError

    try:
        sys.exit(main())
    except VitPruneError as exc:
        sys.exit(f"error: {exc}")
