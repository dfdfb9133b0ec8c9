"""Accuracy and wall time of the embedded default model: a ViT trained from scratch on Fashion-MNIST.

Runs ``vitprune train`` (any extra arguments after ``--`` are passed on) or, with ``--from-run DIR``,
summarises a finished run without training again (e.g. the run that produced ``vitprune/assets``).
Writes ``benchmarks/results/train_fashion_mnist.{json,md}``. Other processes competing for the CPU make the
wall time pessimistic, so the load average seen during training and the process CPU time are recorded too.

    python benchmarks/train_fashion_mnist.py                      # train with the defaults, then report
    python benchmarks/train_fashion_mnist.py --from-run runs/fashion_mnist_vit
    python benchmarks/train_fashion_mnist.py -- --epochs 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import REPO, markdown_table, write_results

from vitprune.cli.main import main as vitprune_main
from vitprune.models.io import load


def summarize(run: Path) -> dict:
    meta = json.loads((run / "model" / "meta.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    curve = []
    metrics = run / "metrics.jsonl"
    steps_per_epoch = None
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        rec = json.loads(line)
        if "loss" in rec and rec.get("epoch"):
            steps_per_epoch = rec["step"] / rec["epoch"]
        if rec.get("eval"):
            curve.append({"step": rec["step"], "top1": rec["eval"].get("top1")})
    for point in curve:
        point["epoch"] = round(point["step"] / steps_per_epoch, 2) if steps_per_epoch else None
    model = load(run / "model")
    macs = None
    try:
        from vitprune.metrics.flops import count_macs

        macs = int(count_macs(model)["total"])
    except Exception:  # the MAC counter is optional here
        macs = None
    size = (run / "model" / "model.safetensors").stat().st_size
    return {
        "run_dir": str(run),
        "train_command": meta.get("command"),
        "architecture": {
            "embed_dim": model.config.embed_dim,
            "depth": model.config.depth,
            "heads": model.config.blocks[0].heads,
            "mlp_dim": model.config.blocks[0].mlp_dim,
            "patch_size": model.config.patch_size,
        },
        "params": meta.get("params"),
        "macs_per_image": macs,
        "weights_bytes": size,
        "test": meta.get("test") or summary.get("eval"),
        "accuracy_curve": curve,
        "epochs": summary.get("epochs"),
        "images_seen": summary.get("images_seen"),
        "train_wall_s": summary.get("train_time_s"),
        "train_cpu_s": summary.get("cpu_time_s"),
        "command_wall_s": meta.get("wall_s"),
        "torch_threads": (meta.get("machine") or {}).get("torch_threads"),
        "loadavg_start": meta.get("loadavg_start"),
        "loadavg_during": meta.get("loadavg_during"),
        "loadavg_end": meta.get("loadavg_end"),
        "training_config": summary.get("config"),
        "trained_at": meta.get("date"),
        "training_machine": meta.get("machine"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from-run",
        type=Path,
        action="append",
        default=None,
        help="summarise this finished run instead (repeat to compare runs; the first is the headline)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_fashion_mnist")
    parser.add_argument("train_args", nargs="*", help="extra `vitprune train` arguments (after --)")
    args = parser.parse_args()
    runs = args.from_run
    if runs is None:
        runs = [args.out]
        code = vitprune_main(["train", "--out", str(args.out), "--overwrite", "--no-progress", *args.train_args])
        if code:
            return code
    records = [summarize(run) for run in runs]
    rows = []
    for rec in records:
        t = rec["test"] or {}
        load = rec["loadavg_during"] or {}
        rows.append(
            [
                "{embed_dim}d/{depth}L/{heads}h/p{patch_size}".format(**rec["architecture"]),
                rec["params"],
                f"{rec['weights_bytes'] / 1e6:.2f} MB",
                f"{rec['macs_per_image'] / 1e6:.1f} M" if rec["macs_per_image"] else "n/a",
                rec["epochs"],
                t.get("top1"),
                rec["train_wall_s"],
                rec["train_cpu_s"],
                rec["torch_threads"],
                load.get("mean_1min"),
            ]
        )
    headers = [
        "model",
        "params",
        "weights",
        "MACs/img",
        "epochs",
        "test top-1 %",
        "train wall s",
        "train CPU s",
        "threads",
        "load avg (1 min, mean)",
    ]
    md = "# Default model: ViT from scratch on Fashion-MNIST\n\n" + markdown_table(headers, rows) + "\n\n"
    for rec in records:
        curve = ", ".join(f"ep {p['epoch']}: {p['top1']:.2f}" for p in rec["accuracy_curve"] if p["top1"] is not None)
        c = rec["training_config"] or {}
        recipe = ", ".join(f"{k} {c.get(k)}" for k in ("batch_size", "lr", "warmup_steps", "label_smoothing"))
        md += f"- `{rec['train_command']}` ({recipe})"
        md += (f"; test top-1 during training: {curve}" if curve else "") + "\n"
    md += (
        "- wall time is of a 2-core machine shared with other jobs: the 1-minute load average during training is"
        " recorded (2.0 = both cores busy); CPU time is the training process's own (one thread: about the wall"
        " time it would take alone on one core).\n"
    )
    rec = {"headline": records[0], "runs": records}
    write_results("train_fashion_mnist", rec, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
