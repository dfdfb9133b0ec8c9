"""INT8 dynamic quantization of the Linear layers for users who stay in PyTorch (CPU).

Backends: ``torchao`` (maintained; ``Int8DynamicActivationInt8WeightConfig``: int8 symmetric per-channel weights,
per-token dynamic int8 activations) and ``torch.ao`` (``torch.ao.quantization.quantize_dynamic``, deprecated since
torch 2.10 but still shipped in 2.13, with fused fbgemm/onednn kernels). ``auto`` takes torchao when it is
installed, else torch.ao. The patch embedding (a Conv) and, by default, the classifier head stay fp32.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitPruneError

BACKENDS = ("auto", "torchao", "torch.ao")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao's import logs a warning per CUDA kernel library it cannot load on a CPU build; hide them."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _torchao() -> Any | None:
    try:
        with _quiet():
            import torchao.quantization as tq
    except ImportError:
        return None
    return tq


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise VitPruneError(f"unknown torch INT8 backend {backend!r} ({', '.join(BACKENDS)})")
    if backend == "auto":
        return "torchao" if _torchao() is not None else "torch.ao"
    if backend == "torchao" and _torchao() is None:
        raise VitPruneError("the torchao backend needs the 'torchao' package: pip install vitprune[torchao]")
    return backend


def quantize_torch_dynamic(model: nn.Module, backend: str = "auto", keep_head: bool = True) -> nn.Module:
    """A copy of ``model`` (CPU, fp32, eval) whose ``nn.Linear`` layers run INT8 dynamic quantization.

    ``keep_head`` leaves the classifier (``head`` / ``head_dist``) in fp32. The copy records
    ``int8 = {"mode": "dynamic", "backend": ...}``.
    """
    name = resolve_backend(backend)
    out = copy.deepcopy(model).to("cpu", torch.float32).eval()
    skip = {"head", "head_dist"} if keep_head else set()
    targets = {n for n, m in out.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    if not targets:
        raise VitPruneError("the model has no Linear layers to quantize")
    try:
        if name == "torchao":
            tq = _torchao()
            with _quiet():
                tq.quantize_(out, tq.Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn in targets)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the torch.ao deprecation notice
                out = torch.ao.quantization.quantize_dynamic(out, targets, dtype=torch.qint8)
    except Exception as exc:
        raise VitPruneError(f"torch INT8 quantization ({name}) failed: {type(exc).__name__}: {exc}") from None
    out.int8 = {"mode": "dynamic", "backend": name, "layers": len(targets)}
    return out
