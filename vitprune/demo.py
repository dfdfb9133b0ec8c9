"""``vitprune demo``: every method on the shipped Fashion-MNIST ViT, measured side by side, in minutes on a CPU.

The demo needs no download: it takes the embedded default model (:mod:`vitprune.training.default_model`) and
the Fashion-MNIST IDX files, then runs EVERY method of the registry (:func:`vitprune.pruners.available`) through
the one pruning interface:

- structural methods (NViT, VTP, the L2 and Taylor baselines, ...) to ``nvit_target_macs`` of the dense MACs - the
  first one (NViT) sets the MACs the others then match - each with the SAME training budget inside the method
  (``method_steps``: distillation between ``prune_rounds`` rounds, or VTP's gate training;
  :meth:`~vitprune.pruners.structural.StructuralPruner.budget_settings`);
- unstructured methods (oViT/OBS, global / uniform magnitude, Wanda, SparseGPT) to ``sparsity`` with the SAME
  calibration images;

then gives every pruned model the SAME short recovery (distillation from the dense model through
:class:`~vitprune.training.engine.Trainer`: same steps, learning rate, batches and data order; unstructured masks
held at zero), times all models round-robin in ONE :func:`~vitprune.metrics.latency.compare_many` run, and scores
top-1 on the Fashion-MNIST test set. Output: one table (stdout) and a report directory (``report.md``,
``report.json``, PNG plots, the pruned models), written atomically. A method added to the registry appears here
with no edit to this file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs, count_params, format_count
from vitprune.metrics.sparsity import nonzero_params, prunable_weights, sparsity_vs_dense
from vitprune.models.vit import ViT
from vitprune.utils.fs import atomic_path, check_writable_target

DEFAULT_OUT = "vitprune-demo"
STRUCTURAL, UNSTRUCTURED = "structural", "unstructured"


@dataclass
class DemoConfig:
    """Budgets of one demo run. :meth:`quick` is the test-sized variant."""

    nvit_target_macs: float = 0.4  # NViT keeps this fraction of the dense MACs; the other structural ones match it
    sparsity: float = 0.8  # unstructured sparsity of the qkv / proj / fc1 / fc2 weights (OBS and GM)
    batch_size: int = 128  # every training and calibration batch
    recovery_steps: int = 120  # SAME distillation recovery for every pruned model
    recovery_lr: float = 5e-4
    method_steps: int = 100  # training inside every structural method (between rounds, or VTP's gate training)
    method_lr: float = 2e-4
    nvit_prune_steps: int = 5  # selection rounds of every structural method
    nvit_batches_per_step: int = 8  # scoring batches per round (NViT saliency, Taylor gradients)
    vtp_lambda: float = 1e-4
    vtp_gate_lr: float = 1e-2
    round_to: int = 8  # structural widths rounded up to a multiple (hardware-friendly), all three methods
    obs_num_grads: int = 256  # per-sample gradients in the OBS Fisher
    obs_block_size: int = 64
    obs_damp: float | None = None  # None: OBSConfig's default (relative to each layer's mean Fisher diagonal)
    eval_batch_size: int = 1000
    latency_batch: int = 256
    latency_runs: int = 20
    latency_warmup: int = 3
    train_limit: int | None = None  # first N training images (None: all 60,000)
    test_limit: int | None = None  # first N test images (None: all 10,000)
    seed: int = 0
    # torch intra-op threads for the whole run (None: leave torch's setting). The model is tiny: on 2 cores a
    # second thread made a training step 3x SLOWER (wall) and cost 2-4x the CPU time on a busy machine (measured)
    threads: int | None = 1

    @classmethod
    def quick(cls) -> DemoConfig:
        """Tiny budgets for tests: every stage runs, nothing is trained for long."""
        return cls(
            batch_size=32,
            recovery_steps=3,
            method_steps=4,
            nvit_prune_steps=2,
            nvit_batches_per_step=1,
            obs_num_grads=16,
            obs_block_size=16,
            eval_batch_size=250,
            latency_batch=16,
            latency_runs=3,
            latency_warmup=1,
            train_limit=1024,
            test_limit=250,
        )

    def validate(self) -> DemoConfig:
        if not 0 < self.nvit_target_macs < 1:
            raise VitPruneError(f"nvit_target_macs must be in (0, 1), got {self.nvit_target_macs}")
        if not 0 < self.sparsity < 1:
            raise VitPruneError(f"sparsity must be in (0, 1), got {self.sparsity}")
        for name in ("batch_size", "recovery_steps", "method_steps", "nvit_prune_steps", "nvit_batches_per_step"):
            if getattr(self, name) < 1:
                raise VitPruneError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


# ------------------------------------------------------------------------------------------------ helpers
class _Clock:
    """Wall and process CPU seconds of named stages."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        self.stages[name] = {
            "wall_s": round(time.perf_counter() - t, 2),
            "cpu_s": round(time.process_time() - c, 2),
        }
        return out

    def total(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.t0, 2),
            "cpu_s": round(time.process_time() - self.c0, 2),
        }


def _loader(dataset, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, generator=g)


def _check_model(model: nn.Module) -> ViT:
    if not isinstance(model, ViT):
        raise VitPruneError(f"the demo needs a vitprune ViT, got {type(model).__name__}")
    c = model.config
    if (c.in_chans, c.img_size, c.num_classes) != (1, 28, 10):
        raise VitPruneError(
            f"the demo model must take 28x28 grey images and predict the 10 Fashion-MNIST classes "
            f"(got in_chans={c.in_chans}, img_size={c.img_size}, num_classes={c.num_classes})"
        )
    return model


# ------------------------------------------------------------------------------------------------ the run
class Demo:
    """One demo run (see the module docstring); :meth:`run` returns the report dict."""

    def __init__(
        self,
        config: DemoConfig,
        model: ViT | None = None,
        data_root: str | os.PathLike | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = config.validate()
        self.log = log
        if model is None:
            from vitprune.training.default_model import default_model_meta, load_default_model

            model = load_default_model()
            try:
                self.model_meta: dict[str, Any] = default_model_meta()
            except VitPruneError:
                self.model_meta = {}
            self.model_source = "embedded default (vitprune/assets/fashion_mnist_vit)"
        else:
            self.model_meta, self.model_source = {}, "given"
        self.dense = _check_model(model).eval()
        self.data_root = data_root
        self.clock = _Clock()
        self.rows: dict[str, dict[str, Any]] = {}
        self.models: dict[str, nn.Module] = {}
        self.extra: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------ data
    def _data(self) -> None:
        from vitprune.data.fashion_mnist import FashionMNIST

        cfg = self.cfg
        self.train_set = FashionMNIST(self.data_root, "train", limit=cfg.train_limit)
        test = FashionMNIST(self.data_root, "test", limit=cfg.test_limit)
        self.test_loader = _loader(TensorDataset(*test.tensors()), cfg.eval_batch_size, cfg.seed, shuffle=False)
        self.train_loader = _loader(self.train_set, cfg.batch_size, cfg.seed, shuffle=True)
        self.teacher = copy.deepcopy(self.dense).eval().requires_grad_(False)

    def _top1(self, model: nn.Module) -> float:
        from vitprune.metrics.evaluate import evaluate

        return round(evaluate(model, self.test_loader, progress=False)["top1"], 2)

    def _recover(self, model: nn.Module, masks: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The same short distillation recovery for every method (masks held at zero for unstructured)."""
        from vitprune.training.engine import TrainConfig, Trainer
        from vitprune.training.masks import WeightMasks

        cfg = self.cfg
        tc = TrainConfig(
            steps=cfg.recovery_steps,
            batch_size=cfg.batch_size,
            lr=cfg.recovery_lr,
            min_lr=min(1e-6, cfg.recovery_lr),
            weight_decay=0.05,
            grad_clip=1.0,
            distill_alpha=1.0,
            distill_temperature=1.0,
            seed=cfg.seed,
            log_every=0,
            progress=False,
            tensorboard=False,
        )
        trainer = Trainer(
            model, tc, self.train_loader, teacher=self.teacher, masks=WeightMasks(masks) if masks else None
        )
        summary = trainer.fit()
        model.eval()
        return {k: summary[k] for k in ("steps", "final_loss", "train_time_s", "cpu_time_s") if k in summary}

    def _row(self, name: str, model: nn.Module, kind: str, before: float | None, **info: Any) -> None:
        dense_prunable = prunable_weights(self.dense)
        self.rows[name] = {
            "method": name,
            "type": kind,
            "params": count_params(model.config),
            "params_nonzero": nonzero_params(model),
            "macs": count_macs(model.config)["total"],
            "sparsity": round(sparsity_vs_dense(model, dense_prunable), 4),
            "top1_before_recovery": before,
            "top1": self._top1(model),
            **info,
        }
        self.models[name] = model
        row = self.rows[name]
        pre = f" (before recovery {before:.2f} %)" if before is not None else ""
        macs = format_count(row["macs"])
        self.log(f"  {name}: top-1 {row['top1']:.2f} %{pre}, {macs} MACs, sparsity {row['sparsity']:.3f}")

    # ------------------------------------------------------------------------------------ methods
    def _dense(self) -> None:
        self._row("dense", self.dense, "-", None, train_steps=0)

    def _settings(self, cls: type) -> dict[str, Any]:
        """The demo's budgets as settings of ``cls``: only the fields its config has are passed."""
        from vitprune.pruners.structural import StructuralConfig

        cfg = self.cfg
        offered = {
            "seed": cfg.seed,
            "log_every": 0,
            "progress": False,
            "finetune_steps": 0,
            "lr": cfg.method_lr,
            "round_to": cfg.round_to,
            "batches_per_step": cfg.nvit_batches_per_step,
            "lam": cfg.vtp_lambda,
            "gate_lr": cfg.vtp_gate_lr,
            "sparsity": (cfg.sparsity,),
            "num_grads": cfg.obs_num_grads,
            "num_samples": cfg.obs_num_grads,
            "block_size": cfg.obs_block_size,
            "max_memory_gb": 2.0,
            # like for like, as recorded: no method re-solves its kept weights (NViT's default would)
            "reconstruct": "off",
        }
        if cfg.obs_damp is not None:
            offered["damp"] = cfg.obs_damp
        if cls.kind == STRUCTURAL:
            offered |= cls.budget_settings(cfg.method_steps, cfg.nvit_prune_steps)
        if issubclass(cls.Config, StructuralConfig):  # the greedy rankings: by score alone, as NViT's paper
            offered["criterion"] = "saliency"
        names = {f.name for f in dataclasses.fields(cls.Config)}
        return {k: v for k, v in offered.items() if k in names}

    def _method_steps(self, report: dict[str, Any]) -> int:
        s = report.get("settings", {})
        between = s.get("train_steps_between", 0) * max(s.get("prune_steps", 1) - 1, 0)
        return between + s.get("sparsity_steps", 0)

    def _structural(self, name: str, target: float) -> None:
        from vitprune.pruners import get

        cls = get(name)
        pruner = cls(target_macs=target, **self._settings(cls))
        result = pruner.prune(self.dense, self.train_loader, teacher=self.teacher)
        small = result.model.eval()
        before = self._top1(small)
        rec = self._recover(small)
        report = result.report
        self.extra[cls.label] = {
            "method": name,
            "settings": report["settings"],
            "history": report.get("history"),
            "selection": report.get("selection"),
            "fold_check": report.get("fold_check"),
            "kept_blocks": report["pruned"]["kept_blocks"],
            "recovery": rec,
        }
        self._row(cls.label, small, STRUCTURAL, before, train_steps=self._method_steps(report) + rec["steps"])

    def _calibration_loader(self) -> DataLoader:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed)
        idx = torch.randperm(len(self.train_set), generator=g)[: cfg.obs_num_grads].tolist()
        subset = torch.utils.data.Subset(self.train_set, idx)
        return DataLoader(subset, batch_size=min(cfg.batch_size, 64), shuffle=False)

    def _unstructured(self, name: str) -> None:
        from vitprune.pruners import get

        cls = get(name)
        res = cls(**self._settings(cls)).prune(self.dense, self._calibration_loader())[0]
        model = res.model.eval()
        before = self._top1(model)
        rec = self._recover(model, res.masks)
        keys = ("sparsity", "block_size", "num_grads", "damp", "damp_relative", "grad_mode", "allocation")
        info = {k: v for k, v in res.report.items() if k in keys}
        self.extra[cls.label] = {"method": name, "pruner": info, "recovery": rec}
        self._row(cls.label, model, UNSTRUCTURED, before, train_steps=rec["steps"])

    def _latency(self) -> dict[str, Any]:
        from vitprune.metrics.latency import compare_many

        cfg = self.cfg
        res = compare_many(
            dict(self.models),
            batch_size=cfg.latency_batch,
            warmup=cfg.latency_warmup,
            runs=cfg.latency_runs,
            baseline="dense",
        )
        for name, stats in res["models"].items():
            self.rows[name]["latency_ms"] = round(stats["median_ms"], 3)
            self.rows[name]["speedup"] = round(stats["speedup"], 3)
            self.rows[name]["speedup_p10"] = round(stats["speedup_p10"], 3)
            self.rows[name]["speedup_p90"] = round(stats["speedup_p90"], 3)
        return {k: v for k, v in res.items() if k != "models"} | {
            "per_model": {n: {k: v for k, v in s.items() if k != "times_ms"} for n, s in res["models"].items()}
        }

    def run(self) -> dict[str, Any]:
        cfg, clock, log = self.cfg, self.clock, self.log
        from vitprune.training.runinfo import git_commit, loadavg, machine_info, utc_now

        load_start = loadavg()
        log(
            f"vitprune demo: dense model {self.dense.config.name} ({format_count(count_params(self.dense.config))} "
            f"params, {format_count(count_macs(self.dense.config)['total'])} MACs per image)"
        )
        torch.manual_seed(cfg.seed)
        clock.stage("data", self._data)
        from vitprune.pruners import available, get

        structural, unstructured = available(STRUCTURAL), available(UNSTRUCTURED)
        steps = 2 + len(structural) + len(unstructured)
        log(f"[1/{steps}] dense")
        clock.stage("dense", self._dense)
        target = cfg.nvit_target_macs
        for i, name in enumerate(structural):
            label = get(name).label
            log(f"[{i + 2}/{steps}] {label} to {target:.3f} of the dense MACs, then recovery")
            clock.stage(name, lambda name=name, target=target: self._structural(name, target))
            if i == 0:  # the first structural method sets the MACs the others match
                target = self.rows[label]["macs"] / self.rows["dense"]["macs"]
        for i, name in enumerate(unstructured):
            log(f"[{i + 2 + len(structural)}/{steps}] {get(name).label} to {cfg.sparsity:g} sparsity, then recovery")
            clock.stage(name, lambda name=name: self._unstructured(name))
        log(f"[{steps}/{steps}] latency: {len(self.models)} models round-robin, batch {cfg.latency_batch}, "
            f"{cfg.latency_runs} runs")  # fmt: skip
        latency = clock.stage("latency", self._latency)
        return {
            "title": "vitprune demo: NViT, VTP, oViT/OBS and magnitude baselines on the Fashion-MNIST ViT",
            "model": {
                "source": self.model_source,
                "name": self.dense.config.name,
                "config": self.dense.config.to_dict(),
                "meta": self.model_meta,
            },
            "data": {
                "dataset": "Fashion-MNIST",
                "root": str(self.data_root or "/usr/share/datasets/fashion-mnist"),
                "train_images": len(self.train_set),
                "test_images": len(self.test_loader.dataset),
            },
            "config": asdict(self.cfg),
            "rows": list(self.rows.values()),
            "methods": self.extra,
            "latency": latency,
            "timings": {"stages": clock.stages, "total": clock.total()},
            "machine": machine_info(),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "date": utc_now(),
            "git_commit": git_commit(Path(__file__).resolve().parent),  # "unknown" outside a checkout
        }


# ------------------------------------------------------------------------------------------------ output
COLUMNS = (
    ("method", "method"),
    ("type", "type"),
    ("params", "params (non-zero)"),
    ("macs", "MACs/img"),
    ("sparsity", "sparsity"),
    ("latency_ms", "latency ms"),
    ("speedup", "speed-up [p10, p90]"),
    ("top1_before_recovery", "top-1 before recovery %"),
    ("top1", "top-1 %"),
    ("train_steps", "train steps"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if key == "params":
        return format_count(row["params_nonzero"])
    if key == "macs":
        return format_count(v)
    if key == "sparsity":
        return f"{100 * v:.1f} %"
    if key == "speedup":
        if v is None:
            return "-"
        if row["method"] == "dense" or row.get("speedup_p10") is None:
            return f"{v:.2f}x"
        return f"{v:.2f}x [{row['speedup_p10']:.2f}, {row['speedup_p90']:.2f}]"
    if key == "latency_ms":
        return "-" if v is None else f"{v:.2f}"
    if key in ("top1", "top1_before_recovery"):
        return "-" if v is None else f"{v:.2f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The demo's one table, as aligned text or Markdown."""
    head = [label for _, label in COLUMNS]
    body = [[_cell(r, key) for key, _ in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


# one colour and marker per method (circles/diamonds/triangles: structural, squares/plus: unstructured)
_METHOD_STYLE = {
    "dense": ("black", "*", 180),
    "NViT": ("#1f77b4", "o", 70),
    "VTP": ("#ff7f0e", "D", 55),
    "L2 magnitude": ("#2ca02c", "^", 70),
    "Taylor": ("#17becf", "v", 70),
    "oViT/OBS": ("#d62728", "s", 65),
    "global magnitude": ("#9467bd", "P", 80),
    "uniform magnitude": ("#8c564b", "X", 70),
    "Wanda": ("#e377c2", "h", 70),
    "SparseGPT": ("#bcbd22", "<", 70),
}
_FALLBACK = [("#7f7f7f", ">", 70), ("#393b79", "p", 70), ("#637939", "d", 70), ("#843c39", "8", 70)]


def _style(name: str, i: int) -> tuple[str, str, float]:
    return _METHOD_STYLE.get(name, _FALLBACK[i % len(_FALLBACK)])


def plot_top1(rows: Sequence[dict[str, Any]], x_key: str, xlabel: str, title: str, path: Path) -> None:
    """Top-1 after recovery (filled marker) and before it (hollow, arrow to the recovered point) vs ``x_key``;
    one colour and marker per method, named in the legend (labels next to points collide when points cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 5.0))
    scale = 1e3 if x_key == "params_nonzero" else 1.0
    xs, ys = [], []
    for i, r in enumerate(rows):
        color, marker, size = _style(r["method"], i)
        x, y = r[x_key] / scale, r["top1"]
        xs.append(x)
        ys.append(y)
        kind = "" if r["type"] == "-" else f" ({r['type']})"
        ax.scatter([x], [y], s=size, marker=marker, color=color, alpha=0.9, zorder=3, label=r["method"] + kind)
        if r.get("top1_before_recovery") is not None:
            y0 = r["top1_before_recovery"]
            ys.append(y0)
            ax.scatter([x], [y0], s=size, marker=marker, facecolors="none", edgecolors=color, linewidths=1.3, zorder=2)
            ax.annotate("", xy=(x, y), xytext=(x, y0), arrowprops={"arrowstyle": "->", "color": color, "lw": 0.9})
    handles, _ = ax.get_legend_handles_labels()
    hollow = {"marker": "o", "markerfacecolor": "none", "linestyle": "", "markersize": 8}
    handles.append(plt.Line2D([], [], color="grey", label="hollow: pruned,\nbefore recovery", **hollow))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 on the Fashion-MNIST test set (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlim(0, max(xs) * 1.1)
    ax.set_ylim(max(0.0, min(ys) - 3), min(101.0, max(ys) + 2))
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], models: dict[str, nn.Module], dense: ViT, directory: Path) -> None:
    """report.json, report.md, plots and models into ``directory`` (an empty temporary folder)."""
    from vitprune.models.io import save
    from vitprune.reports import plot_block_dims, write_json_report

    rows = report["rows"]
    lat = report["latency"]
    plots = {
        "top1_vs_params": "top1_vs_params.png",
        "top1_vs_latency": "top1_vs_latency.png",
    }
    plot_top1(
        rows,
        "params_nonzero",
        "non-zero parameters (thousands)",
        "Top-1 vs parameters (unstructured: non-zero only)",
        directory / plots["top1_vs_params"],
    )
    plot_top1(
        rows,
        "latency_ms",
        f"measured latency, ms per batch of {lat['batch_size']} ({lat['device']}, torch threads: {lat['threads']})",
        "Top-1 vs measured latency (unstructured: dense kernels)",
        directory / plots["top1_vs_latency"],
    )
    for r in rows:
        if r["type"] != STRUCTURAL:
            continue
        slug = _slug(r["method"])
        kept = report["methods"].get(r["method"], {}).get("kept_blocks")
        name = f"dims_{slug}.png"
        plot_block_dims(dense.config, models[r["method"]].config, directory / name, title=r["method"], kept_blocks=kept)
        plots[f"dims_{slug}"] = name
    models_dir = directory / "models"
    models_dir.mkdir()
    for name, model in models.items():
        if name != "dense":
            save(model, models_dir / _slug(name), meta={"demo": {"method": name}})
    report["plots"] = plots
    write_json_report(directory / "report.json", report)
    (directory / "report.md").write_text(report_markdown(report))


def _relax_permissions(root: Path) -> None:
    """The temporary folder of an atomic write is private (0700 / 0600): give the report the umask's modes."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _damp_text(report: dict[str, Any]) -> str:
    info = report["methods"].get("oViT/OBS", {}).get("pruner", {})
    if "damp" not in info:
        return "default damping"
    kind = "x the mean Fisher diagonal" if info.get("damp_relative", False) else "(absolute)"
    return f"damping {info['damp']:g} {kind}"


def report_markdown(report: dict[str, Any]) -> str:
    cfg, lat, t = report["config"], report["latency"], report["timings"]
    m = report["machine"]
    lines = [
        f"# {report['title']}",
        "",
        f"Dense model: `{report['model']['name']}` ({report['model']['source']}); data: Fashion-MNIST, "
        f"{report['data']['train_images']} training / {report['data']['test_images']} test images.",
        "",
        format_table(report["rows"], markdown=True),
        "",
        "- **params (non-zero)**: parameters of the architecture minus the exact zeros of the qkv/proj/fc1/fc2 "
        "weights; **MACs/img**: multiply-accumulates of one image's forward pass as executed (dense kernels: "
        "unstructured zeros are still computed); **sparsity**: share of the dense model's qkv/proj/fc1/fc2 "
        "weights that are removed (structural) or exactly zero (unstructured).",
        f"- **latency / speed-up**: median of {lat['rounds']} round-robin runs of every model in one "
        f"`compare_many` call (batch {lat['batch_size']}, {lat['device']}, torch threads {lat['threads']}, "
        f"{lat['dtype']}); speed-up = dense median / model median, with the 10th and 90th percentiles of the "
        "per-round ratios (adjacent runs: machine drift cancels; a wide interval means a busy machine).",
        f"- **top-1**: on the Fashion-MNIST test set after the SAME recovery for every pruned model "
        f"({cfg['recovery_steps']} steps of distillation from the dense model, batch {cfg['batch_size']}, "
        f"lr {cfg['recovery_lr']:g}); *before recovery*: the pruned model as the method leaves it (structural "
        f"methods include the same {cfg['method_steps']} training steps of their own: distillation between "
        f"{cfg['nvit_prune_steps']} selection rounds, or VTP's gate training). **train steps** = steps inside the "
        "method + recovery.",
        f"- NViT targets {cfg['nvit_target_macs']:g} of the dense MACs; every other structural method targets "
        f"the MACs NViT reached; the unstructured methods prune {cfg['sparsity']:g} of the prunable weights with "
        f"the same {cfg['obs_num_grads']} calibration images (OBS: per-sample gradients, block "
        f"{cfg['obs_block_size']}, {_damp_text(report)}).",
        "",
        "## Plots",
        "",
    ]
    for key, name in report["plots"].items():
        lines += [f"### {key}", "", f"![{key}]({name})", ""]
    lines += ["## Timings (seconds)", "", "| stage | wall | CPU |", "| --- | --- | --- |"]
    for name, s in t["stages"].items():
        lines.append(f"| {name} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} |")
    lines.append(f"| **total** | {t['total']['wall_s']:.1f} | {t['total']['cpu_s']:.1f} |")
    lines += [
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (threads {m['torch_threads']}), "
        f"Python {m['python']}; load average at start {report['loadavg_start']}, at end {report['loadavg_end']} "
        "(other processes competing for the CPU inflate the wall times, not the CPU times).",
        f"- command: `{report.get('command', 'vitprune demo')}`; date (UTC): {report['date']}; "
        f"vitprune commit: {report.get('git_commit', 'unknown')}.",
        "- models: `models/<method>/` (vitprune model directories: `vitprune eval` / `vitprune bench` them).",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    out: str | os.PathLike = DEFAULT_OUT,
    overwrite: bool = False,
    quick: bool = False,
    config: DemoConfig | None = None,
    model: ViT | None = None,
    data_root: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the demo and write its report directory ``out`` atomically (refused if it exists, unless
    ``overwrite``); returns the report dict (``report["rows"]`` is the table)."""
    target = check_writable_target(out, overwrite=overwrite)  # before any work
    cfg = config or (DemoConfig.quick() if quick else DemoConfig())
    from vitprune.metrics.latency import num_threads

    demo = Demo(cfg, model=model, data_root=data_root, log=log)
    with num_threads(cfg.threads):
        report = demo.run()
    report["quick"] = quick
    report["command"] = command or "vitprune demo"
    report["out"] = str(target)
    with atomic_path(target, overwrite=overwrite, is_dir=True) as tmp:
        write_report(report, demo.models, demo.dense, tmp)
        _relax_permissions(tmp)
    return report


def summary_json(report: dict[str, Any]) -> str:
    """The table rows plus where the report went, as JSON (``vitprune demo --json``)."""
    keep = ("out", "quick", "rows", "timings", "date")
    return json.dumps({k: report[k] for k in keep if k in report}, indent=2, default=str)


__all__ = [
    "DEFAULT_OUT",
    "Demo",
    "DemoConfig",
    "format_table",
    "nonzero_params",
    "plot_top1",
    "prunable_weights",
    "run_demo",
    "sparsity_vs_dense",
    "summary_json",
]
