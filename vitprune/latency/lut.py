"""Latency lookup table (LUT) of ViT blocks on the user's device, for latency-aware pruning (NViT Sec. 3.3).

Decomposition (to keep the grid small): the latency of a whole model is predicted as

    stem(emb) + sum over blocks [attn(emb, heads, qk, v) + mlp(emb, mlp)]

- ``attn``: ``x + proj(attention(qkv(LN1(x))))`` of one block, a 4-D table over (emb, heads, qk, v);
- ``mlp``: ``x + fc2(gelu(fc1(LN2(x))))``, a 2-D table over (emb, mlp);
- ``stem``: everything outside the blocks (patch embedding, tokens, position embedding, final norm,
  classifier), a 1-D table over emb.

Each entry is the median of timed runs of the real :class:`vitprune.models.ViT` sub-modules on a fixed batch /
dtype / thread count / token count. Timed alone, the branches miss part of what a whole
model costs (what joins them: the model is one graph / session, not 25 small ones): measured on a 2-core Xeon the
sum under-predicts ONNX Runtime's end-to-end latency of the dense ViT-Tiny by a factor 1.17 at batch 32
(benchmarks/results/lut_accuracy_ort.json, ``calibration``), and scaled by that one factor it predicts random
pruned architectures within 3 % (median), so the factor is nearly constant across sizes. ``build_table(...,
calibrate=config)`` therefore also times the model the table is built for end to end and stores
``meta["scale"] = measured / sum of its branches``; every entry is read multiplied by it (a one-point
calibration: ratios between architectures, which a latency-fraction target uses, are unchanged).

Between grid points the table is interpolated multilinearly (linearly
extrapolated below the smallest grid value; values above the grid are refused). ``vitprune lut check`` measures
random pruned architectures end to end and reports the relative error of this decomposition.

With ``runtime="onnxruntime"`` every grid point's branch (and every architecture of the check) is exported to ONNX
in memory and timed in an ONNX Runtime session (:mod:`vitprune.runtime.ort`, fp32, CPU) instead of eager PyTorch.

A table is tied to the runtime, device, dtype, batch size, thread count (CPU) and token count it was built with;
using it for anything else is refused (or only warned about with ``force=True``). Tables without a ``runtime``
entry (built before it existed) are torch tables.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vitprune.errors import VitPruneError
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.models.vit import Block, ViT
from vitprune.utils.fs import atomic_write_text

FORMAT = "vitprune-lut"
VERSION = 1
AXES = ("emb", "heads", "qk", "v", "mlp")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RUNTIMES = ("torch", "onnxruntime")
DEFAULT_GRID = {  # ViT-Tiny sized (emb 192, 3 heads of 64, MLP 768): 4*4*4*4 + 4*5 + 4 timed points
    "emb": [48, 96, 144, 192],
    "heads": [0, 1, 2, 3],
    "qk": [8, 24, 40, 64],
    "v": [8, 24, 40, 64],
    "mlp": [0, 192, 384, 576, 768],
}


# ------------------------------------------------------------------------------------------------- helpers
def device_name(device: torch.device) -> str:
    """Human-readable name of the device (CPU model from /proc/cpuinfo, or the CUDA device name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def parse_grid(text: str) -> dict[str, list[int]]:
    """``"emb=48,96;heads=0,1,2;qk=8,64;v=8,64;mlp=0,768"`` -> grid dict (missing axes use the defaults)."""
    grid = {k: list(v) for k, v in DEFAULT_GRID.items()}
    for part in filter(None, (p.strip() for p in text.replace(" ", ";").split(";"))):
        name, sep, values = part.partition("=")
        if not sep or name not in AXES:
            raise VitPruneError(f"bad grid entry {part!r}: expected AXIS=V1,V2,... with AXIS in {', '.join(AXES)}")
        try:
            grid[name] = [int(v) for v in values.split(",") if v]
        except ValueError:
            raise VitPruneError(f"bad grid values for {name}: {values!r} (integers expected)") from None
    return validate_grid(grid)


def validate_grid(grid: dict[str, Sequence[int]]) -> dict[str, list[int]]:
    out = {}
    for name in AXES:
        values = [int(v) for v in grid.get(name, [])]
        if not values:
            raise VitPruneError(f"grid axis {name} is empty")
        if values != sorted(set(values)) or values[0] < 0:
            raise VitPruneError(f"grid axis {name} must be strictly increasing non-negative integers: {values}")
        if name in ("emb", "qk", "v") and values[0] == 0:
            raise VitPruneError(f"grid axis {name} must start above 0")
        out[name] = values
    return out


def grid_for_config(config: ViTConfig, points: int = 4) -> dict[str, list[int]]:
    """A grid covering ``config``'s largest dims: ``points`` values per axis in multiples of 8 (heads: all)."""

    def axis(top: int, start_zero: bool) -> list[int]:
        if top <= 0:
            return [0] if start_zero else [1]
        vals = {round(top * i / (points - 1) / 8.0) * 8 for i in range(points)} | {top}
        vals = {v for v in vals if v > 0 or start_zero}
        return sorted(vals | ({0} if start_zero else set())) or [top]

    b = config.blocks
    heads_top = max((x.heads for x in b), default=1)
    heads = sorted(set(np.linspace(0, heads_top, min(points, heads_top + 1)).round().astype(int).tolist()))
    return validate_grid(
        {
            "emb": axis(config.embed_dim, False),
            "heads": heads,
            "qk": axis(max((x.qk_dim for x in b), default=8), False),
            "v": axis(max((x.v_dim for x in b), default=8), False),
            "mlp": axis(max((x.mlp_dim for x in b), default=0), True),
        }
    )


def _interp(grid: Sequence[Sequence[int]], table: np.ndarray, point: Sequence[float]) -> float:
    """Multilinear interpolation on a rectilinear grid (linear extrapolation outside it)."""
    corners: list[list[tuple[int, float]]] = []
    for g, x in zip(grid, point, strict=True):
        g = np.asarray(g, dtype=float)
        if len(g) == 1:
            corners.append([(0, 1.0)])
            continue
        i = int(np.clip(np.searchsorted(g, x, side="right") - 1, 0, len(g) - 2))
        t = (x - g[i]) / (g[i + 1] - g[i])
        corners.append([(i, 1.0 - t), (i + 1, t)])
    total = 0.0
    for combo in itertools.product(*corners):
        w = 1.0
        for _, wi in combo:
            w *= wi
        total += w * float(table[tuple(i for i, _ in combo)])
    return total


# ------------------------------------------------------------------------------------------------- table
@dataclass
class LatencyTable:
    """Timed latencies (milliseconds per batch) over a grid; see the module docstring."""

    meta: dict[str, Any]
    grid: dict[str, list[int]]
    attn_ms: np.ndarray  # (emb, heads, qk, v)
    mlp_ms: np.ndarray  # (emb, mlp)
    stem_ms: np.ndarray  # (emb,)
    notes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------ prediction
    def _check_range(self, emb: int, block: BlockConfig | None = None) -> None:
        g = self.grid
        over = [(n, x, g[n][-1]) for n, x in (("emb", emb),) if x > g[n][-1]]
        if block is not None:
            vals = {"heads": block.heads, "qk": block.qk_dim, "v": block.v_dim, "mlp": block.mlp_dim}
            over += [(n, x, g[n][-1]) for n, x in vals.items() if x > g[n][-1]]
        if over:
            n, x, top = over[0]
            raise VitPruneError(f"{n}={x} is above the latency table's grid (max {top}): rebuild it for this model")

    @property
    def scale(self) -> float:
        """End-to-end calibration factor (1 for tables built without ``calibrate``); see the module docstring."""
        return float(self.meta.get("scale", 1.0))

    def attn(self, emb: int, block: BlockConfig) -> float:
        self._check_range(emb, block)
        if block.heads == 0 or block.v_dim == 0:
            block = BlockConfig(0, self.grid["qk"][0], self.grid["v"][0], block.mlp_dim)
        g = self.grid
        point = (emb, block.heads, block.qk_dim, block.v_dim)
        return self.scale * max(0.0, _interp([g["emb"], g["heads"], g["qk"], g["v"]], self.attn_ms, point))

    def mlp(self, emb: int, mlp_dim: int) -> float:
        self._check_range(emb)
        if mlp_dim > self.grid["mlp"][-1]:
            raise VitPruneError(f"mlp={mlp_dim} is above the latency table's grid (max {self.grid['mlp'][-1]})")
        return self.scale * max(0.0, _interp([self.grid["emb"], self.grid["mlp"]], self.mlp_ms, (emb, mlp_dim)))

    def stem(self, emb: int) -> float:
        self._check_range(emb)
        return self.scale * max(0.0, _interp([self.grid["emb"]], self.stem_ms, (emb,)))

    def block(self, emb: int, block: BlockConfig) -> float:
        return self.attn(emb, block) + self.mlp(emb, block.mlp_dim)

    def predict(self, config: ViTConfig) -> float:
        """Predicted latency (ms per batch) of a whole model."""
        return self.stem(config.embed_dim) + sum(self.block(config.embed_dim, b) for b in config.blocks)

    def covers(self, config: ViTConfig) -> None:
        """Raise unless every dim of ``config`` lies within the grid (and tokens match)."""
        tokens = config.num_prefix_tokens + config.num_patches
        if tokens != self.meta["tokens"]:
            raise VitPruneError(f"latency table was built for {self.meta['tokens']} tokens, the model has {tokens}")
        for b in config.blocks:
            self._check_range(config.embed_dim, b)

    # ------------------------------------------------------------------------------------ compatibility
    def check_compatible(
        self,
        device: str | torch.device,
        batch_size: int | None = None,
        dtype: str | None = None,
        threads: int | None = None,
        force: bool = False,
        runtime: str | None = None,
        force_flag: str = "--force",
    ) -> list[str]:
        """Refuse (or with ``force`` warn about) using the table for another device / batch / dtype / threads /
        runtime (``runtime`` None: not checked); the refusal names ``force_flag``, the caller's option."""
        dev = torch.device(device)
        m = self.meta
        problems = []
        if runtime is not None and runtime != self.runtime:
            problems.append(f"runtime {runtime} (table: {self.runtime})")
        if dev.type != m["device_type"]:
            problems.append(f"device type {dev.type} (table: {m['device_type']})")
        elif device_name(dev) != m["device_name"]:
            problems.append(f"device {device_name(dev)!r} (table: {m['device_name']!r})")
        if batch_size is not None and batch_size != m["batch_size"]:
            problems.append(f"batch size {batch_size} (table: {m['batch_size']})")
        if dtype is not None and dtype != m["dtype"]:
            problems.append(f"dtype {dtype} (table: {m['dtype']})")
        if dev.type == "cpu":
            threads = threads if threads is not None else torch.get_num_threads()
            if threads != m["threads"]:
                problems.append(f"{threads} threads (table: {m['threads']})")
        if problems and not force:
            raise VitPruneError(f"latency table does not match this setting: {'; '.join(problems)} ({force_flag})")
        if problems:
            warnings.warn("latency table built for another setting: " + "; ".join(problems), stacklevel=2)
        return problems

    @property
    def runtime(self) -> str:
        """What the table was timed with: "torch" (eager PyTorch) or "onnxruntime"."""
        return str(self.meta.get("runtime", "torch"))

    # ------------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "meta": self.meta,
            "grid": self.grid,
            "attn_ms": self.attn_ms.round(6).tolist(),
            "mlp_ms": self.mlp_ms.round(6).tolist(),
            "stem_ms": self.stem_ms.round(6).tolist(),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise VitPruneError(f"not a vitprune latency table (format {FORMAT!r} expected)")
        if data.get("version") != VERSION:
            raise VitPruneError(f"unsupported latency table version {data.get('version')} (expected {VERSION})")
        try:
            grid = validate_grid(data["grid"])
            table = cls(
                data["meta"],
                grid,
                np.asarray(data["attn_ms"], dtype=float),
                np.asarray(data["mlp_ms"], dtype=float),
                np.asarray(data["stem_ms"], dtype=float),
                data.get("notes", {}),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise VitPruneError(f"invalid latency table: {exc}") from None
        shapes = {
            "attn_ms": (table.attn_ms.shape, tuple(len(grid[a]) for a in ("emb", "heads", "qk", "v"))),
            "mlp_ms": (table.mlp_ms.shape, (len(grid["emb"]), len(grid["mlp"]))),
            "stem_ms": (table.stem_ms.shape, (len(grid["emb"]),)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise VitPruneError(f"invalid latency table: {name} has shape {got}, grid needs {want}")
        return table

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        p = Path(path)
        if not p.is_file():
            raise VitPruneError(f"latency table not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise VitPruneError(f"latency table {p} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


# ------------------------------------------------------------------------------------------------- timing
STATS = {"median": statistics.median, "min": min}


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int, stat: str = "median") -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return STATS[stat](times)


def _runner(module: nn.Module, example: torch.Tensor, runtime: str, threads: int | None) -> Callable[[], Any]:
    """``module(example)`` as a no-argument call: eager PyTorch, or the module exported to an ORT session."""
    if runtime == "torch":
        return lambda: module(example)
    from vitprune.runtime.ort import module_session

    runner = module_session(module, example, threads)
    feed = {runner.input_name: example.detach().cpu().numpy()}
    return lambda: runner.session.run(None, feed)


def _check_runtime(runtime: str, device: torch.device, dtype: str) -> None:
    if runtime not in RUNTIMES:
        raise VitPruneError(f"unknown latency-table runtime {runtime!r} (expected {', '.join(RUNTIMES)})")
    if runtime == "onnxruntime":
        from vitprune.runtime.ort import require_onnxruntime

        require_onnxruntime()
        if device.type != "cpu" or dtype != "float32":
            raise VitPruneError("an onnxruntime latency table is built on the cpu in float32")


class _AttnBranch(nn.Module):
    def __init__(self, blk: Block) -> None:
        super().__init__()
        self.norm1, self.attn = blk.norm1, blk.attn

    def forward(self, x):
        return x + self.attn(self.norm1(x))


class _MlpBranch(nn.Module):
    def __init__(self, blk: Block) -> None:
        super().__init__()
        self.norm2, self.mlp = blk.norm2, blk.mlp

    def forward(self, x):
        return x + self.mlp(self.norm2(x))


def build_table(
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    dtype: str = "float32",
    threads: int | None = None,
    grid: dict[str, Sequence[int]] | None = None,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    prefix_tokens: int = 1,
    num_classes: int = 1000,
    warmup: int = 2,
    runs: int = 7,
    progress: bool = True,
    stat: str = "median",
    runtime: str = "torch",
    calibrate: ViTConfig | None = None,
) -> LatencyTable:
    """Time attention / MLP branches and the stem over ``grid`` on ``device`` (see the module docstring).

    ``stat`` summarises the timed runs of each point: "median" (default) or "min" (robust to other processes
    competing for the CPU, which only ever add time); :func:`check_table` uses the table's statistic.
    ``runtime="onnxruntime"`` times each branch exported to ONNX in an ONNX Runtime session (CPU, float32).
    ``calibrate``: also time this architecture end to end and scale the table so that it predicts it exactly."""
    if stat not in STATS:
        raise VitPruneError(f"unknown timing statistic {stat!r} (expected {', '.join(STATS)})")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VitPruneError("device 'cuda' requested but no CUDA GPU is available")
    if dtype not in DTYPES:
        raise VitPruneError(f"unknown dtype {dtype!r} (expected {', '.join(DTYPES)})")
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise VitPruneError("need batch >= 1, runs >= 1 and warmup >= 0")
    if img_size % patch_size:
        raise VitPruneError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    _check_runtime(runtime, dev, dtype)
    grid = validate_grid(grid or DEFAULT_GRID)
    tdtype = DTYPES[dtype]
    tokens = prefix_tokens + (img_size // patch_size) ** 2
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise VitPruneError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if calibrate is not None:  # refuse before timing anything
        LatencyTable({"tokens": tokens}, grid, np.zeros(0), np.zeros(0), np.zeros(0)).covers(calibrate)
    n_points = len(list(itertools.product(grid["emb"], grid["heads"], grid["qk"], grid["v"])))
    n_points += len(grid["emb"]) * (len(grid["mlp"]) + 1)
    bar = tqdm(total=n_points, desc="lut", disable=not progress, dynamic_ncols=True)
    E, H, Q, V, M = (len(grid[a]) for a in AXES)
    attn = np.zeros((E, H, Q, V))
    mlp = np.zeros((E, M))
    stem = np.zeros(E)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for ie, e in enumerate(grid["emb"]):
                x = torch.randn(batch_size, tokens, e, generator=gen).to(dev, tdtype)
                for (ih, h), (iq, q), (iv, v) in itertools.product(
                    enumerate(grid["heads"]), enumerate(grid["qk"]), enumerate(grid["v"])
                ):
                    branch = _AttnBranch(Block(e, BlockConfig(h, q, v, 0), 1e-6, True, 0.0)).to(dev, tdtype).eval()
                    run = _runner(branch, x, runtime, threads)
                    attn[ie, ih, iq, iv] = _time_ms(run, dev, warmup, runs, stat)
                    bar.update(1)
                for im, m in enumerate(grid["mlp"]):
                    branch = _MlpBranch(Block(e, BlockConfig(0, 0, 0, m), 1e-6, True, 0.0)).to(dev, tdtype).eval()
                    mlp[ie, im] = _time_ms(_runner(branch, x, runtime, threads), dev, warmup, runs, stat)
                    bar.update(1)
                cfg = ViTConfig(
                    embed_dim=e,
                    blocks=[],
                    num_classes=num_classes,
                    img_size=img_size,
                    patch_size=patch_size,
                    in_chans=in_chans,
                    class_token=prefix_tokens >= 1,
                    distilled=prefix_tokens >= 2,
                    global_pool="token" if prefix_tokens >= 1 else "avg",
                )
                vit = ViT(cfg).to(dev, tdtype).eval()
                images = torch.randn(batch_size, in_chans, img_size, img_size, generator=gen).to(dev, tdtype)
                stem[ie] = _time_ms(_runner(vit, images, runtime, threads), dev, warmup, runs, stat)
                bar.update(1)
            if calibrate is not None:
                whole = ViT(calibrate).to(dev, tdtype).eval()
                images = torch.randn(batch_size, in_chans, img_size, img_size, generator=gen).to(dev, tdtype)
                calibration_ms = _time_ms(_runner(whole, images, runtime, threads), dev, warmup, runs, stat)
        used_threads = torch.get_num_threads()
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    meta = {
        "runtime": runtime,
        "device_type": dev.type,
        "device_name": device_name(dev),
        "dtype": dtype,
        "batch_size": batch_size,
        "threads": used_threads if dev.type == "cpu" else None,
        "tokens": tokens,
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "prefix_tokens": prefix_tokens,
        "num_classes": num_classes,
        "warmup": warmup,
        "runs": runs,
        "stat": stat,
        "torch": torch.__version__,
        **({"onnxruntime": _ort_version()} if runtime == "onnxruntime" else {}),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    table = LatencyTable(meta, grid, attn, mlp, stem)
    if calibrate is not None:
        raw = table.predict(calibrate)
        if raw <= 0:
            raise VitPruneError("the latency table predicts no time for the calibration model")
        # Significant digits, not decimals: a tiny model's times are fractions of a millisecond.
        meta["scale"] = float(f"{calibration_ms / raw:.7g}")
        meta["calibration"] = {"measured_ms": float(f"{calibration_ms:.7g}"), "branches_ms": float(f"{raw:.7g}")}
    return table


def _ort_version() -> str:
    from vitprune.runtime.ort import require_onnxruntime

    return str(require_onnxruntime().__version__)


def random_architecture(
    base: ViTConfig, grid: dict[str, list[int]], generator: torch.Generator, multiple: int = 8
) -> ViTConfig:
    """A random pruned architecture of ``base`` within ``grid`` (dims in multiples of ``multiple``)."""

    def pick(lo: int, hi: int, step: int) -> int:
        choices = list(range(lo, hi + 1, step)) or [hi]
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    top_e = min(base.embed_dim, grid["emb"][-1])
    emb = pick(max(multiple, grid["emb"][0]), top_e, multiple)
    blocks = []
    for b in base.blocks:
        heads = pick(0, min(b.heads, grid["heads"][-1]), 1)
        qk = pick(multiple, min(b.qk_dim, grid["qk"][-1]), multiple) if heads else 0
        v = pick(multiple, min(b.v_dim, grid["v"][-1]), multiple) if heads else 0
        mlp = pick(0, min(b.mlp_dim, grid["mlp"][-1]), 2 * multiple)
        blocks.append(BlockConfig(heads, qk, v, mlp, scale=b.scale))
    return replace(base, embed_dim=emb, blocks=blocks, extra={})


def check_table(
    table: LatencyTable,
    base: ViTConfig,
    num_archs: int = 5,
    device: str | torch.device = "cpu",
    seed: int = 0,
    warmup: int = 2,
    runs: int = 5,
    include_base: bool = True,
    progress: bool = True,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Predicted vs measured latency of ``base`` and ``num_archs`` random pruned versions of it (timed round
    robin, the table's per-point statistic over ``runs`` rounds) with ``runtime`` (default: the table's; each
    architecture is exported to an ONNX Runtime session for "onnxruntime").

    Returns ``{"archs": [{"predicted_ms", "measured_ms", "rel_error", ...}...], "median_rel_error",
    "max_rel_error", "median_ratio_error", "max_ratio_error"}``; ``rel_error = |predicted - measured| / measured``;
    the ratio errors compare latency *relative to the first (dense) architecture*, which is what a latency-fraction
    pruning target depends on.
    """
    dev = torch.device(device)
    table.covers(base)
    runtime = runtime or table.runtime
    _check_runtime(runtime, dev, table.meta["dtype"])
    dtype = DTYPES[table.meta["dtype"]]
    gen = torch.Generator().manual_seed(seed)
    configs = ([base] if include_base else []) + [random_architecture(base, table.grid, gen) for _ in range(num_archs)]
    rows = []
    threads = table.meta["threads"]
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    stat = STATS[table.meta.get("stat", "median")]
    try:
        models = [ViT(cfg).to(dev, dtype).eval() for cfg in configs]
        x = torch.randn(table.meta["batch_size"], base.in_chans, base.img_size, base.img_size).to(dev, dtype)
        runs_of = [_runner(model, x, runtime, threads) for model in models]
        times: list[list[float]] = [[] for _ in models]
        with torch.inference_mode():
            # round robin (every model once per round) so that machine drift affects all models alike
            for r in tqdm(range(warmup + runs), desc="lut check", disable=not progress, dynamic_ncols=True):
                for i, run in enumerate(runs_of):
                    t = _time_ms(run, dev, 0, 1)
                    if r >= warmup:
                        times[i].append(t)
        for cfg, t in zip(configs, times, strict=True):
            measured = stat(t)
            predicted = table.predict(cfg)
            rows.append(
                {
                    "predicted_ms": round(predicted, 4),
                    "measured_ms": round(measured, 4),
                    "rel_error": abs(predicted - measured) / measured,
                    "embed_dim": cfg.embed_dim,
                    "blocks": [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in cfg.blocks],
                }
            )
    finally:
        torch.set_num_threads(old)
    errors = [r["rel_error"] for r in rows]
    ratio_errors = []
    if include_base:  # what a pruning target uses: latency relative to the dense model
        for r in rows[1:]:
            pred = r["predicted_ms"] / rows[0]["predicted_ms"]
            meas = r["measured_ms"] / rows[0]["measured_ms"]
            r["predicted_ratio"], r["measured_ratio"] = round(pred, 4), round(meas, 4)
            ratio_errors.append(abs(pred - meas) / meas)
    return {
        "archs": rows,
        "median_rel_error": statistics.median(errors),
        "max_rel_error": max(errors),
        "median_ratio_error": statistics.median(ratio_errors) if ratio_errors else None,
        "max_ratio_error": max(ratio_errors) if ratio_errors else None,
        "device": str(dev),
        "device_name": device_name(dev),
        "batch_size": table.meta["batch_size"],
        "dtype": table.meta["dtype"],
        "threads": threads,
        "runtime": runtime,
    }
