"""Wall-clock latency of a forward pass, and fair side-by-side comparisons of models.

Comparisons run the models *alternately* in one process (round-robin ``a, b, a, b, ...``) so that slow drifts of
the machine (thermal state, other processes, frequency scaling) affect every model alike; the speed-up is the ratio
of medians, with the spread of the per-round ratios as an error estimate.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.utils.device import resolve_device


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads(threads)`` for the block (unchanged when None) and restore it after."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise VitPruneError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(times_ms: list[float], batch_size: int) -> dict[str, float]:
    """Median / mean / p10 / p90 / std / min of per-batch times (ms) and the median throughput."""
    s = sorted(times_ms)
    median = statistics.median(s)
    return {
        "median_ms": median,
        "mean_ms": statistics.fmean(s),
        "p10_ms": _percentile(s, 10),
        "p90_ms": _percentile(s, 90),
        "std_ms": statistics.stdev(s) if len(s) > 1 else 0.0,
        "min_ms": s[0],
        "images_per_s": batch_size * 1000.0 / median if median > 0 else float("inf"),
    }


def _input_spec(model: nn.Module, img_size: int | None) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    size = img_size if img_size is not None else getattr(cfg, "img_size", None)
    if size is None:
        raise VitPruneError(f"img_size is required for a {type(model).__name__} without a ViT config")
    if size <= 0:
        raise VitPruneError(f"img_size must be positive, got {size}")
    return int(getattr(cfg, "in_chans", 3)), int(size)


def model_on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` itself if all its tensors are on ``device`` in ``dtype``, else a moved copy (the caller's stays)."""

    def elsewhere(t: torch.Tensor) -> bool:
        wrong_device = t.device.type != device.type or (device.index is not None and t.device.index != device.index)
        return wrong_device or (t.is_floating_point() and t.dtype != dtype)

    if any(elsewhere(t) for t in [*model.parameters(), *model.buffers()]):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def compare_many(
    models: dict[str, nn.Module],
    batch_size: int = 32,
    img_size: int | None = None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Time several models round-robin (each round runs every model once, in order) on the same random input.

    Returns ``{"models": {name: stats}, "baseline", "rounds", "batch_size", "threads", "device", "dtype",
    "img_size"}``; each ``stats`` is :func:`summarize_times` plus ``speedup`` (baseline median / this median),
    ``speedup_p10`` / ``speedup_p90`` (spread of the per-round ratios) and ``times_ms`` (every timed run).
    """
    if not models:
        raise VitPruneError("no models to time")
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise VitPruneError(f"need batch_size >= 1, runs >= 1, warmup >= 0 (got {batch_size}, {runs}, {warmup})")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise VitPruneError(f"baseline {baseline!r} is not one of the models: {', '.join(models)}")
    specs = {name: _input_spec(m, img_size) for name, m in models.items()}
    if len(set(specs.values())) > 1:
        raise VitPruneError(f"models expect different inputs (channels, size): {specs}; pass img_size")
    in_chans, size = next(iter(specs.values()))
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    sync = _sync(dev)
    prepared = {name: model_on(m, dev, dtype) for name, m in models.items()}
    was_training = {name: m.training for name, m in prepared.items()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    gen = torch.Generator().manual_seed(0)  # a fixed input, without touching the global RNG
    x = torch.randn(batch_size, in_chans, size, size, generator=gen).to(device=dev, dtype=dtype)
    try:
        for m in prepared.values():
            m.eval()
        with num_threads(threads) as used_threads, torch.inference_mode():
            for _ in range(warmup):
                for m in prepared.values():
                    m(x)
            sync()
            for _ in range(runs):
                for name, m in prepared.items():
                    t0 = time.perf_counter()
                    m(x)
                    sync()
                    times[name].append((time.perf_counter() - t0) * 1000.0)
    finally:
        for name, m in prepared.items():
            m.train(was_training[name])
    results: dict[str, dict[str, Any]] = {}
    base = times[baseline]
    for name, t in times.items():
        stats: dict[str, Any] = summarize_times(t, batch_size)
        ratios = sorted(b / v for b, v in zip(base, t, strict=True))
        stats["speedup"] = statistics.median(base) / stats["median_ms"]
        stats["speedup_p10"] = _percentile(ratios, 10)
        stats["speedup_p90"] = _percentile(ratios, 90)
        stats["times_ms"] = t
        results[name] = stats
    return {
        "models": results,
        "baseline": baseline,
        "rounds": runs,
        "warmup": warmup,
        "batch_size": batch_size,
        "threads": used_threads,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "img_size": size,
    }


def measure_latency(
    model: nn.Module,
    batch_size: int = 32,
    img_size: int | None = None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Latency of one batch forward pass (random input, ``torch.inference_mode``, eval mode).

    Returns ``{median_ms, mean_ms, p10_ms, p90_ms, std_ms, min_ms, images_per_s, batch_size, threads, device,
    runs, warmup, dtype, img_size}``. ``threads`` sets ``torch.set_num_threads`` for the measurement only.
    """
    res = compare_many({"model": model}, batch_size, img_size, threads, warmup, runs, device, dtype)
    stats = {k: v for k, v in res["models"]["model"].items() if not k.startswith("speedup") and k != "times_ms"}
    keep = ("batch_size", "threads", "device", "warmup", "dtype", "img_size")
    return {**stats, **{k: res[k] for k in keep}, "runs": runs}


def compare_latency(
    model_a: nn.Module,
    model_b: nn.Module,
    batch_size: int = 32,
    img_size: int | None = None,
    threads: int | None = None,
    warmup: int = 3,
    runs: int = 10,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Time ``model_a`` and ``model_b`` alternately; ``ratio`` = median_a / median_b (the speed-up of b over a).

    Returns ``{"a": stats, "b": stats, "ratio", "ratio_p10", "ratio_p90", ...}`` where the p10/p90 are those of
    the per-round ratios ``a_i / b_i`` (adjacent runs, so machine drift cancels).
    """
    res = compare_many({"a": model_a, "b": model_b}, batch_size, img_size, threads, warmup, runs, device, dtype)
    a, b = res["models"]["a"], res["models"]["b"]
    strip = ("speedup", "speedup_p10", "speedup_p90", "times_ms")
    out = {k: v for k, v in res.items() if k not in ("models", "baseline")}
    out["a"] = {k: v for k, v in a.items() if k not in strip}
    out["b"] = {k: v for k, v in b.items() if k not in strip}
    out["ratio"], out["ratio_p10"], out["ratio_p90"] = b["speedup"], b["speedup_p10"], b["speedup_p90"]
    return out
