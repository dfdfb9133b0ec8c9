"""Export any (pruned, ragged) :class:`~vitprune.models.ViT` to ONNX and check it with onnxruntime.

Uses torch's TorchScript-based exporter (``dynamo=False``), which needs no extra package to trace; ``onnx`` (model
checker, metadata) and ``onnxruntime`` (numerical check) are the optional ``vitprune[onnx]`` extra. The ViT's
Python-level branches (an emptied attention or MLP returns its bias; zero QK width gives uniform attention) are
resolved at trace time, so every per-block shape exports as plain ops. The image size is fixed at export (the
position-embedding interpolation is folded in); the batch dimension is dynamic unless ``dynamic_batch=False``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.metrics.latency import model_on
from vitprune.utils.fs import atomic_path, check_writable_target

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install vitprune[onnx]"
MIN_OPSET = 14  # scaled_dot_product_attention needs opset 14


def max_opset() -> int:
    """Highest opset torch's TorchScript exporter supports (20 in torch 2.13)."""
    try:
        from torch.onnx import _constants

        return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):
        return 18


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise VitPruneError(f"ONNX export needs the '{module}' package: {INSTALL_HINT}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _legacy_exporter_kwargs() -> dict[str, Any]:
    """``dynamo=False`` where torch has the switch (2.5+; the TorchScript exporter is the only one before)."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def _run_onnxruntime(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | None = None,
    batch_size: int = 1,
    opset: int = 17,
    dynamic_batch: bool = True,
    overwrite: bool = False,
    check: bool = True,
    atol: float = 1e-3,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (eval mode, float32, CPU) as an ONNX graph ``images (B, C, H, W) -> logits (B, classes)``.

    With ``check`` the file is validated by ``onnx.checker`` and run with onnxruntime on a random batch (of
    ``batch_size + 1`` images when the batch is dynamic, to exercise it); the largest absolute logit difference
    from PyTorch is returned and must be ``<= atol``, otherwise nothing is written. The architecture (config
    JSON) is stored in the ONNX metadata under ``vitprune_config``, with ``metadata`` (string key/values, e.g.
    ``vitprune_preprocess``: the preprocessing JSON that ``vitprune eval`` applies). The write is atomic and an
    existing ``path`` is refused unless ``overwrite``.

    Returns ``{"path", "max_abs_diff" (None without check), "onnx_file_bytes", "opset", "img_size",
    "dynamic_batch", "input_name", "output_name"}``.
    """
    onnx = _require("onnx")
    if check:
        _require("onnxruntime")
    target = check_writable_target(path, overwrite)
    if batch_size < 1:
        raise VitPruneError(f"batch_size must be >= 1, got {batch_size}")
    if not MIN_OPSET <= opset <= max_opset():
        raise VitPruneError(f"opset {opset} is not supported: use {MIN_OPSET} to {max_opset()}")
    cfg = getattr(model, "config", None)
    size = img_size if img_size is not None else getattr(cfg, "img_size", None)
    if size is None or size <= 0:
        raise VitPruneError("export needs a positive img_size (or a vitprune ViT, whose config has one)")
    in_chans = int(getattr(cfg, "in_chans", 3))

    model = model_on(model, torch.device("cpu"), torch.float32)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_chans, size, size, generator=gen)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    try:
        with atomic_path(target, overwrite=overwrite) as tmp:
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
                    torch.onnx.export(
                        model,
                        (x,),
                        str(tmp),
                        **_legacy_exporter_kwargs(),
                        opset_version=opset,
                        input_names=[INPUT_NAME],
                        output_names=[OUTPUT_NAME],
                        dynamic_axes=dynamic_axes,
                        do_constant_folding=True,
                    )
                graph = onnx.load(str(tmp))
                props = {"vitprune_config": cfg.to_json()} if cfg is not None and hasattr(cfg, "to_json") else {}
                props.update(metadata or {})
                if props:
                    onnx.helper.set_model_props(graph, props)
                onnx.save(graph, str(tmp))
                del graph
            except VitPruneError:
                raise
            except Exception as exc:  # the exporter raises many types; report one line
                raise VitPruneError(f"ONNX export failed: {_first_line(exc)}") from None
            max_diff = None
            if check:
                try:
                    onnx.checker.check_model(str(tmp))
                except Exception as exc:
                    raise VitPruneError(f"exported ONNX model is invalid: {_first_line(exc)}") from None
                xb = torch.randn(batch_size + int(dynamic_batch), in_chans, size, size, generator=gen)
                with torch.inference_mode():
                    ref = model(xb).float()
                got = _run_onnxruntime(tmp, xb)
                if got.shape != ref.shape:
                    raise VitPruneError(f"onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
                max_diff = float((got - ref).abs().max()) if ref.numel() else 0.0
                if not max_diff <= atol:
                    raise VitPruneError(f"ONNX logits differ from PyTorch by {max_diff:.3g} (> atol {atol:g})")
            size_bytes = tmp.stat().st_size
    finally:
        model.train(was_training)
    return {
        "path": str(target),
        "max_abs_diff": max_diff,
        "onnx_file_bytes": size_bytes,
        "opset": opset,
        "img_size": size,
        "dynamic_batch": dynamic_batch,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
    }
