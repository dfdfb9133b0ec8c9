"""Peak memory of one forward pass (activations and temporaries, beyond the weights and the input).

Method:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before
  the forward pass.
- CPU: the PyTorch profiler with ``profile_memory=True`` records every allocation and free that PyTorch's CPU
  allocator makes (size and time stamp); the peak of their running sum is the forward pass's peak. This is exact
  in bytes, deterministic and in-process. Process-level measures are not: ``ru_maxrss`` is a high-water mark
  that cannot be reset (only a fresh child process could measure one forward), and RSS includes the memory that
  glibc keeps cached after frees, library arenas and page rounding; ``tracemalloc`` sees no tensor memory at all.
  What this does not see: scratch memory that oneDNN/BLAS allocate with their own ``malloc`` (small, fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.metrics.latency import model_on
from vitprune.utils.device import resolve_device


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cpu_forward_peak(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(peak, retained) bytes of allocations made by ``model(x)`` on CPU, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError as exc:  # the profiler's result layout changed in this torch version
        raise VitPruneError(f"CPU memory profiling is not supported by torch {torch.__version__}: {exc}") from None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):
            current += e.nbytes()
            peak = max(peak, current)
    del out
    return peak, current


def measure_peak_memory(
    model: nn.Module,
    batch_size: int = 32,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    input_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Peak bytes allocated during one ``inference_mode`` forward pass of a batch of random inputs.

    ``input_shape`` (without the batch) defaults to ``(in_chans, img_size, img_size)`` from a ViT's config.
    Returns ``{"peak_bytes", "retained_bytes" (still allocated after the call: the output), "param_bytes",
    "buffer_bytes", "input_bytes", "batch_size", "device", "dtype", "method"}``.
    """
    if batch_size < 1:
        raise VitPruneError(f"batch_size must be >= 1, got {batch_size}")
    if input_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise VitPruneError(f"input_shape is required for a {type(model).__name__} without a ViT config")
        size = img_size if img_size is not None else cfg.img_size
        input_shape = (cfg.in_chans, size, size)
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    model = model_on(model, dev, dtype)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device=dev, dtype=dtype)
    try:
        with torch.inference_mode():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                out = model(x)
                torch.cuda.synchronize(dev)
                peak = torch.cuda.max_memory_allocated(dev) - base
                retained = torch.cuda.memory_allocated(dev) - base
                del out
                method = "torch.cuda.max_memory_allocated"
            elif dev.type == "cpu":
                peak, retained = _cpu_forward_peak(model, x)
                method = "torch.profiler memory events (CPU allocator)"
            else:
                raise VitPruneError(f"peak memory is measured on cpu or cuda, not {dev.type}")
    finally:
        model.train(was_training)
    return {
        "peak_bytes": int(peak),
        "retained_bytes": int(retained),
        "param_bytes": _tensor_bytes(model.parameters()),
        "buffer_bytes": _tensor_bytes(model.buffers()),
        "input_bytes": x.numel() * x.element_size(),
        "batch_size": batch_size,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "method": method,
    }
