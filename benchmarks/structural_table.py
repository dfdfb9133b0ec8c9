"""The structural-pruning table: NViT, VTP and Torch-Pruning side by side, with speed measured in ONE run.

Reads what the structural benchmarks recorded (``benchmarks/results/<stem>.json`` of
``nvit_benchmark.py``, ``tp_baseline.py`` and ``vtp_prune.py``: top-1 one-shot and after the shared recovery
budget) and the models they saved under ``--models`` (``--save-dir`` of those scripts), then times every final
model round-robin with the dense one at batch 32 and batch 1 (one run per batch size, on whatever machine runs
this: run it alone on a quiet machine). For NViT models pruned to a latency target it also times them at the
lookup table's own batch size and threads and reports how far the measured latency fraction lands from the
target. Writes ``benchmarks/results/structural.{json,md}``.

    python benchmarks/structural_table.py --models runs/structural --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, markdown_table, write_results

from vitprune.errors import VitPruneError
from vitprune.metrics.latency import compare_many
from vitprune.models.checkpoints import load_model


def _load(stem: str) -> dict[str, Any] | None:
    path = RESULTS / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, int | float) else "-"


def _vtp_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The recorded vtp_prune.py runs, plus a run rebuilt from the ``meta.json`` of every saved VTP model that no
    recorded run covers (a run stopped before it wrote its results file still leaves its finished models)."""
    runs = [r for r in (_load(stem) for stem in args.vtp) if r]
    covered = {_vtp_model(run, r, args.models) for run in runs for r in run["results"]}
    metas = [
        m for m in sorted(Path(args.models).glob("vtp-macs-*-recovered/meta.json")) if m.parent.name not in covered
    ]
    if metas:
        runs.append(
            {
                "budget": {"images_seen": None},
                "results": [json.loads(m.read_text())["vtp_prune"] for m in metas],
                "args": {"lam": None, "gates": None},
                "from_meta": [str(m) for m in metas],
                "dense": {"eval": {"n": None}},
            }
        )
    return runs


def _vtp_model(run: dict[str, Any], row: dict[str, Any], models: str) -> str:
    """The saved model of one VTP row, relative to ``--models`` (a run saved elsewhere: that folder's path)."""
    name = f"vtp-macs-{row['target_macs']:g}-recovered"
    save_dir = run["args"].get("save_dir")
    if not save_dir or Path(save_dir).resolve() == Path(models).resolve():
        return name
    return os.path.relpath(Path(save_dir) / name, models)


def collect_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per pruned model: method, config, target, MACs/params, top-1 one-shot / recovered, budget, model dir."""
    rows: list[dict[str, Any]] = []
    dense: dict[str, Any] = {}
    for stem in args.nvit:
        nvit = _load(stem)
        if not nvit:
            continue
        dense = dense or nvit["dense"]
        for r in nvit["results"]:
            rec = r.get("recovery") or {}
            tgt = f"{r['metric']} {r['target']:g}"
            rows.append(
                {
                    "method": "NViT (vitprune)",
                    "config": f"{nvit['settings']['criterion']}, {nvit['settings']['prune_steps']} rounds",
                    "target": tgt,
                    "metric": r["metric"],
                    "target_value": r["target"],
                    "macs_fraction": r["macs_fraction"],
                    "params": r["params"],
                    "oneshot": r["oneshot"]["top1"],
                    "recovered": (r.get("recovered") or {}).get("top1"),
                    "images": rec.get("images_seen"),
                    "minutes": rec.get("minutes"),
                    "val_n": r["oneshot"]["n"],
                    "model": r["name"] + ("-recovered" if rec else ""),
                    "lut_pred_fraction": r.get("lut_pred_fraction"),
                }
            )
    for stem in args.tp:
        tp = _load(stem)
        if not tp:
            continue
        dense = dense or tp["dense"]
        for r in tp["results"]:
            rec = r.get("recovery") or {}
            rows.append(
                {
                    "method": "Torch-Pruning 1.6.1",
                    "config": f"{r['importance']} {r['scope']}, {tp['settings']['attn']}",
                    "target": f"macs {r['target_macs_fraction']:g}",
                    "metric": "macs",
                    "target_value": r["target_macs_fraction"],
                    "macs_fraction": r["macs_fraction"],
                    "params": r["params"],
                    "oneshot": r["oneshot"]["top1"],
                    "recovered": (r.get("recovered") or {}).get("top1"),
                    "images": rec.get("images_seen"),
                    "minutes": rec.get("minutes"),
                    "val_n": r["oneshot"]["n"],
                    "model": r["name"] + ("-recovered" if rec else ""),
                }
            )
    for vtp in _vtp_runs(args):
        b = vtp["budget"]
        for r in vtp["results"]:
            rows.append(
                {
                    "method": "VTP (vitprune)",
                    "config": f"lambda {vtp['args']['lam']:g}, gate lr {vtp['args']['gate_lr']:g}, "
                    f"{vtp['args']['sparsity_share']:.0%} of the budget gate training, gates {vtp['args']['gates']}"
                    if vtp["args"].get("lam") is not None
                    else "vtp_prune.py defaults (from the saved model's meta.json)",
                    "target": f"macs {r['target_macs']:g}",
                    "metric": "macs",
                    "target_value": r["target_macs"],
                    "macs_fraction": r["macs_fraction"],
                    "params": round(r["params_fraction"] * (dense.get("params") or 0)) or None,
                    "oneshot": r["top1_after_surgery"],
                    "recovered": r["top1_final"],
                    "images": b["images_seen"]
                    or sum((r.get(k) or {}).get("images_seen", 0) for k in ("sparsity", "finetune")),
                    "minutes": r["wall_s"] / 60.0,
                    "val_n": r.get("val_n") or vtp["dense"]["eval"]["n"],
                    "model": _vtp_model(vtp, r, args.models),
                    "oneshot_note": "after sparsity training",
                    "source": "meta.json of the saved model (vtp_prune.py run stopped early)"
                    if vtp.get("from_meta")
                    else None,
                }
            )
    recovered = {r["model"].removesuffix("-recovered") for r in rows if r["model"].endswith("-recovered")}
    rows = [r for r in rows if r["model"].endswith("-recovered") or r["model"] not in recovered]
    return rows, dense


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="runs/structural", help="folder the benchmarks saved their models in")
    ap.add_argument(
        "--nvit",
        nargs="*",
        default=["nvit_benchmark", "nvit_benchmark_50", "nvit_benchmark_latency"],
        help="nvit_benchmark stems",
    )
    ap.add_argument(
        "--tp", nargs="*", default=["tp_baseline_oneshot", "tp_baseline_recovery", "tp_baseline_recovery_50"]
    )
    ap.add_argument(
        "--vtp",
        nargs="*",
        default=["vtp_benchmark", "vtp_benchmark_50", "vtp_tune_70_share25_lam1e-3", "vtp_tune_70_share50_lam1e-3"],
        help="vtp_prune.py stems",
    )
    ap.add_argument("--lut", default=None, help="the table the latency-targeted NViT runs used")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs-b32", type=int, default=10)
    ap.add_argument("--runs-b1", type=int, default=40)
    ap.add_argument("--name", default="structural")
    args = ap.parse_args(argv)
    import _structural_common as S

    rows, dense_rec = collect_rows(args)
    if not any(r["method"].startswith("NViT") for r in rows) or not any(r["method"].startswith("Torch") for r in rows):
        raise VitPruneError(
            f"no NViT ({', '.join(args.nvit) or '-'}) or Torch-Pruning ({', '.join(args.tp) or '-'}) results in "
            f"{RESULTS}: run nvit_benchmark.py and tp_baseline.py first"
        )
    models_dir = Path(args.models)
    dense = S.load_dense()
    models: dict[str, torch.nn.Module] = {"dense": dense}
    for r in rows:
        path = models_dir / r["model"]
        if (path / "config.json").is_file() and r["model"] not in models:
            models[r["model"]] = load_model(str(path)).eval()
    speed = {}
    for bs, n in ((32, args.runs_b32), (1, args.runs_b1)):
        res = compare_many(models, batch_size=bs, threads=args.threads, warmup=2, runs=n, baseline="dense")
        speed[bs] = {k: {kk: vv for kk, vv in v.items() if kk != "times_ms"} for k, v in res["models"].items()}
        speed[bs]["_threads"] = res["threads"]
        print(f"b{bs}: " + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in res["models"].items()), flush=True)
    latency_checks = []
    if args.lut:
        from vitprune.latency.lut import LatencyTable

        lut = LatencyTable.load(args.lut)
        bs, thr = int(lut.meta.get("batch_size") or 1), lut.meta.get("threads")
        lat_models = {"dense": dense, **{r["model"]: models[r["model"]] for r in rows if r["metric"] == "latency"}}
        if len(lat_models) > 1:
            res = compare_many(lat_models, batch_size=bs, threads=thr, warmup=2, runs=args.runs_b32, baseline="dense")
            for r in rows:
                if r["metric"] == "latency" and r["model"] in res["models"]:
                    measured = 1.0 / res["models"][r["model"]]["speedup"]
                    latency_checks.append(
                        {
                            "model": r["model"],
                            "target": r["target_value"],
                            "lut_pred_fraction": r.get("lut_pred_fraction"),
                            "measured_fraction": measured,
                            "relative_miss": measured / r["target_value"] - 1.0,
                            "batch_size": bs,
                            "threads": res["threads"],
                        }
                    )
    for r in rows:
        for bs in (32, 1):
            s = speed[bs].get(r["model"])
            r[f"speedup_b{bs}"] = s["speedup"] if s else None
        r["speedup_over_macs_ratio"] = (
            r["speedup_b32"] * r["macs_fraction"] if r["speedup_b32"] and r["macs_fraction"] else None
        )
    rows.sort(key=lambda r: (r["metric"], -r["target_value"], r["method"], r["config"]))
    table = [
        [
            r["target"],
            r["method"],
            r["config"],
            f"{r['macs_fraction']:.3f}",
            r["params"] or "-",
            _fmt(r["oneshot"]),
            _fmt(r["recovered"]),
            r["images"] or "-",
            _fmt(r["minutes"], 1),
            _fmt(r["speedup_b32"]),
            _fmt(r["speedup_b1"]),
            _fmt(r["speedup_over_macs_ratio"]),
        ]
        for r in rows
    ]
    headers = [
        "target",
        "method",
        "config",
        "MACs fraction",
        "params",
        "one-shot top-1 %",
        "recovered top-1 %",
        "recovery images",
        "recovery min",
        "speed-up b32",
        "speed-up b1",
        "speed-up b32 x MACs fraction",
    ]
    md = (
        "# Structural pruning of the shared ViT-Tiny: NViT, VTP and Torch-Pruning side by side\n\n"
        f"Dense: top-1 {_fmt(dense_rec.get('top1'))} % on the same val subset, {dense_rec.get('params')} params.\n\n"
        + markdown_table(headers, table)
        + "\n\n"
        "- one-shot = right after pruning, no training (VTP: after its gate sparsity training, which is part of its"
        " budget); recovered = after the recovery budget (distillation from the dense model); the budget is the"
        " same number of training images for every method (the minutes are what each run took on a shared"
        " 2-core machine)\n"
        "- speed-up = dense median latency / model median latency, all models timed round-robin in one run per"
        f" batch size ({speed[32]['_threads']} threads); the last column is 1.0 when the speed-up equals the"
        " MACs reduction\n"
    )
    if any(r.get("source") for r in rows):
        md += (
            "- VTP rows marked in the JSON as `source: meta.json` come from the models a `vtp_prune.py` run saved"
            " before it was stopped (it writes its own results file only at the end)\n"
        )
    if latency_checks:
        md += (
            "\nLatency-targeted NViT (timed at the lookup table's batch size and threads, side by side with dense):\n\n"
        )
        md += markdown_table(
            ["model", "target", "LUT-predicted fraction", "measured fraction", "miss"],
            [
                [
                    c["model"],
                    c["target"],
                    _fmt(c["lut_pred_fraction"], 3),
                    _fmt(c["measured_fraction"], 3),
                    f"{100 * c['relative_miss']:+.1f} %",
                ]
                for c in latency_checks
            ],
        )
        md += "\n"
    record = {"rows": rows, "dense": dense_rec, "speed": {str(k): v for k, v in speed.items()}}
    record["latency_checks"] = latency_checks
    path = write_results(args.name, record, md)
    print(md)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
