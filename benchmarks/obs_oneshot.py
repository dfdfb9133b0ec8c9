"""One-shot unstructured pruning of the shared ViT-Tiny: oViT/OBS vs GM, UM, Wanda, SparseGPT (no recovery).

Calibration: a fixed seeded random subset of ``tiny-imagenet-200/train`` (the same images for every method;
OBS uses one per-sample gradient per image). Evaluation: top-1 on a fixed subset of ``val`` (every
``--val-stride``-th image in sorted order; stride 2 = 2,500 images) with the "shared" preprocessing.
Targets 50/60/70/80 % of the weights of every qkv/proj/fc1/fc2; OBS models for all targets come from ONE
Fisher + trace pass (the sweep). Wall time and the process's peak RSS are recorded for the OBS pass (it runs
first, before anything else is loaded).

    python benchmarks/obs_oneshot.py                      # full run (tens of minutes on a 2-core CPU)
    python benchmarks/obs_oneshot.py --num-grads 64 --val-stride 50 --methods obs gm --name obs_smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import cached_batches, loadavg, markdown_table, shared_data, shared_model, write_results
from torch.utils.data import Subset

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.metrics import evaluate
from vitprune.models.checkpoints import load_model
from vitprune.pruners.baselines import prune_baseline
from vitprune.pruners.calibration import find_linears
from vitprune.pruners.obs import OBSConfig, OBSSolver, peak_rss_bytes

DENSE_TOP1_FULL_VAL = 69.46


def obs_config(args: argparse.Namespace) -> OBSConfig:
    """The OBS settings of this script's arguments (``obs_recovery.py`` parses the same ones)."""
    names = ("block_size", "num_grads", "damp", "criterion", "allocation")
    return OBSConfig(damp_relative=not args.damp_absolute, **{n: getattr(args, n) for n in names})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--data", default=str(shared_data()))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--methods", nargs="+", default=["obs", "gm", "um", "wanda", "sparsegpt"])
    ap.add_argument("--num-grads", type=int, default=1024, help="calibration images = OBS per-sample gradients")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=OBSConfig.damp, help="relative to the mean Fisher diagonal")
    ap.add_argument("--damp-absolute", action="store_true")
    ap.add_argument("--fisher-labels", default="data", choices=["data", "model"])
    ap.add_argument("--latency", action="store_true", help="also time CSR linears vs dense (batch 8)")
    ap.add_argument("--criterion", default=OBSConfig.criterion, choices=["cumulative", "marginal"])
    ap.add_argument("--also-marginal", action="store_true", help="also report OBS with the other criterion")
    ap.add_argument("--grad-batch", type=int, default=16)
    ap.add_argument("--allocation", default="global", choices=["global", "layer"])
    ap.add_argument("--val-stride", type=int, default=2, help="evaluate on every k-th val image (2 -> 2,500)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="obs_oneshot")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = loadavg()
    root = Path(args.data)
    transform = build_eval_transform("shared")
    model = load_model(args.model)
    train = ImageFolderDataset(root / "train", transform, args.classes)
    g = torch.Generator().manual_seed(args.seed)
    calib_idx = torch.randperm(len(train), generator=g)[: args.num_grads].tolist()
    calib = Subset(train, calib_idx)
    calib_loader = make_loader(calib, args.grad_batch, workers=0)
    results: dict[str, dict[str, dict]] = {}
    models: dict[tuple[str, float], torch.nn.Module] = {}

    if "obs" in args.methods:
        cfg = obs_config(args)
        pruner = OBSSolver(model, cfg)
        t0 = time.perf_counter()
        pruner.estimate_fisher(calib_loader)
        pruner.compute_traces()
        t_single = time.perf_counter()
        single = pruner.models_for(args.targets[:1])
        single_update = time.perf_counter() - t_single
        t_sweep = time.perf_counter()
        sweep = pruner.models_for(args.targets)
        sweep_update = time.perf_counter() - t_sweep
        base = pruner.timings["fisher_s"] + pruner.timings["traces_s"]
        obs_pass = {
            "fisher_s": pruner.timings["fisher_s"],
            "traces_s": pruner.timings["traces_s"],
            "single_target_update_s": single_update,
            "sweep_update_s": sweep_update,
            "single_target_total_s": base + single_update,
            "sweep_total_s": base + sweep_update,
            "sweep_over_single": (base + sweep_update) / (base + single_update),
            "wall_s": time.perf_counter() - t0 - single_update,
            "peak_rss_gib": peak_rss_bytes() / 2**30,
            **{k: v for k, v in pruner.info.items() if k != "lambda_per_layer"},
        }
        print(f"OBS pass: {obs_pass}", flush=True)
        del single
        for t, res in sweep.items():
            models[("obs", t)] = res.model
            results.setdefault("obs", {})[f"{t:.2f}"] = {
                "sparsity": res.report["sparsity"],
                "layer_sparsity": {k: round(v, 4) for k, v in res.report["layer_sparsity"].items()},
            }
        if args.also_marginal:  # same Fisher and traces, the other allocation criterion
            pruner.config.criterion = "marginal" if pruner.config.criterion == "cumulative" else "cumulative"
            label = f"obs-{pruner.config.criterion}"
            for t, res in pruner.models_for(args.targets).items():
                models[(label, t)] = res.model
                results.setdefault(label, {})[f"{t:.2f}"] = {"sparsity": res.report["sparsity"]}
        del pruner, sweep
    else:
        obs_pass = None

    for method in [m for m in args.methods if m != "obs"]:
        t0 = time.perf_counter()
        out = prune_baseline(model, method, args.targets, calib_loader, num_samples=args.num_grads)
        wall = time.perf_counter() - t0
        print(f"{method}: {wall:.1f} s", flush=True)
        for t, res in out.items():
            models[(method, t)] = res.model
            results.setdefault(method, {})[f"{t:.2f}"] = {"sparsity": res.report["sparsity"], "method_wall_s": wall}

    val = ImageFolderDataset(root / "val", transform, args.classes)
    val_sub = Subset(val, list(range(0, len(val), args.val_stride)))
    batches = cached_batches(val_sub, 50)
    dense = evaluate(model, batches, progress=False)
    print(f"dense top1 {dense['top1']:.2f} on {dense['n']}", flush=True)
    for (method, t), m in models.items():
        r = evaluate(m, batches, progress=False)
        results[method][f"{t:.2f}"].update(top1=r["top1"], top5=r["top5"], loss=r["loss"])
        print(f"{method} {t:.2f}: top1 {r['top1']:.2f}", flush=True)

    storage, latency = {}, {}
    if "obs" in results:
        import tempfile

        from vitprune.export.sparse import save_sparse
        from vitprune.models.io import save

        with tempfile.TemporaryDirectory() as tmp:
            save(model, Path(tmp) / "dense")
            dense_bytes = (Path(tmp) / "dense" / "model.safetensors").stat().st_size
            storage["dense_file_bytes"] = dense_bytes
            for t in args.targets:
                info = save_sparse(models[("obs", t)], Path(tmp) / f"s{t}")
                storage[f"{t:.2f}"] = {"file_bytes": info["file_bytes"], "vs_dense": info["file_bytes"] / dense_bytes}
    if args.latency and "obs" in results:
        from vitprune.export.sparse import convert_to_csr
        from vitprune.metrics.latency import compare_latency

        for t in args.targets:
            pruned_names = list(find_linears(models[("obs", t)]))
            csr, names = convert_to_csr(models[("obs", t)], min_sparsity=0.0, names=pruned_names)
            r = compare_latency(models[("obs", t)], csr, batch_size=8, runs=5, warmup=2)
            latency[f"{t:.2f}"] = {
                "dense_ms": r["a"]["median_ms"],
                "csr_ms": r["b"]["median_ms"],
                "speedup": r["ratio"],
                "csr_layers": len(names),
            }
            print(f"CSR {t:.2f}: {latency[f'{t:.2f}']}", flush=True)

    methods = [m for m in args.methods if m in results] + [m for m in results if m.startswith("obs-")]
    rows = []
    for t in args.targets:
        key = f"{t:.2f}"
        rows.append([f"{100 * t:.0f} %", *[results[m][key]["top1"] for m in methods]])
    obs_best = (
        all(
            results["obs"][f"{t:.2f}"]["top1"]
            > max(results[m][f"{t:.2f}"]["top1"] for m in methods if not m.startswith("obs"))
            for t in args.targets
        )
        if "obs" in results and len(methods) > 1
        else None
    )
    record = {
        "model": args.model,
        "calibration": {"images": len(calib), "source": str(root / "train"), "seed": args.seed},
        "val": {"images": dense["n"], "stride": args.val_stride, "source": str(root / "val")},
        "dense": {"top1": dense["top1"], "top5": dense["top5"], "full_val_reference_top1": DENSE_TOP1_FULL_VAL},
        "targets": args.targets,
        "results": results,
        "obs_pass": obs_pass,
        "compressed_storage": storage,
        "csr_latency_batch8": latency,
        "checks": {
            "obs_above_every_baseline": obs_best,
            "obs_50_within_5_points_of_dense": (
                dense["top1"] - results["obs"]["0.50"]["top1"] <= 5.0
                if "obs" in results and "0.50" in results["obs"]
                else None
            ),
            "obs_pass_under_10_min": obs_pass["wall_s"] <= 600 if obs_pass else None,
            "obs_pass_under_8_gb": obs_pass["peak_rss_gib"] <= 8 * 1e9 / 2**30 if obs_pass else None,
            "sweep_at_most_1.2x_single": obs_pass["sweep_over_single"] <= 1.2 if obs_pass else None,
        },
        "load_average": {"start": load_start, "end": loadavg()},
    }
    table = markdown_table(["sparsity", *[f"{m} top-1 %" for m in methods]], rows)
    md = (
        "# One-shot unstructured pruning of ViT-Tiny (Tiny-ImageNet-200), no recovery\n\n"
        f"Dense top-1 on this val subset ({dense['n']} images, every {args.val_stride}th): {dense['top1']:.2f} % "
        f"(full val reference {DENSE_TOP1_FULL_VAL} %). Calibration: {len(calib)} train images (seed {args.seed}), "
        "same for every method.\n\n" + table + "\n"
    )
    if obs_pass:
        md += (
            f"\nOBS pass (Fisher from {obs_pass['num_grads']} per-sample gradients, block {obs_pass['block_size']}, "
            f"damp {obs_pass['damp']}): Fisher {obs_pass['fisher_s']:.0f} s, traces {obs_pass['traces_s']:.0f} s, "
            f"total {obs_pass['wall_s']:.0f} s, peak RSS {obs_pass['peak_rss_gib']:.2f} GiB "
            f"(Fisher inverse {obs_pass['fisher_bytes'] / 2**30:.2f} GiB). Sweep of {len(args.targets)} targets: "
            f"{obs_pass['sweep_total_s']:.0f} s vs {obs_pass['single_target_total_s']:.0f} s for one target "
            f"({obs_pass['sweep_over_single']:.3f}x).\n"
        )
    if storage:
        md += (
            "\nCompressed storage (bitmask + values) of the OBS models vs the dense file: "
            + ", ".join(f"{k}: {v['vs_dense']:.2f}x" for k, v in storage.items() if k != "dense_file_bytes")
            + ".\n"
        )
    if latency:
        md += (
            "\nCPU CSR linears vs dense (batch 8, whole model; measured, not a claim): "
            + ", ".join(f"{k}: {v['speedup']:.2f}x" for k, v in latency.items())
            + ".\n"
        )
    md += f"\nChecks: {record['checks']}\n\nLoad average (1/5/15 min) at start {load_start}, end {loadavg()} "
    md += "(the machine is shared; times are wall-clock).\n"
    path = write_results(args.name, record, md)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
