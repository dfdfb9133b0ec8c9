"""INT8 quantization of exported ONNX models with ``onnxruntime.quantization`` (the ``onnx`` extra).

- ``dynamic``: weights int8 (symmetric, per output channel by default), activations quantized at run time
  (``quantize_dynamic``: MatMulInteger / DynamicQuantizeLinear); needs no data.
- ``static``: QDQ graph (``quantize_static``), activations uint8 with ranges calibrated on images prepared
  with the model's own preprocessing (:func:`calibration_batches`), weights int8 symmetric.

Accuracy levers: per-channel weights (default on); nodes kept in fp32 (``exclude``: the groups
``patch_embed`` (the patch-embedding Conv), ``head`` (the classifier), ``attention`` (the attention score /
softmax / value MatMuls and Softmax), ``mlp_fc2`` (the second MLP linear), exact node names or shell-style
patterns over them (``*/mlp/fc2/*``); default ``patch_embed`` and ``head``, plus ``mlp_fc2`` in static mode);
the graph pre-processing ``quant_pre_process`` (symbolic shape inference + ONNX Runtime graph optimisation,
default on).

Symmetric weight quantization maps 0.0 to the integer 0 (zero point 0), so an unstructured-sparse model keeps
every zero weight exactly; :func:`quantize_onnx` checks it and reports the file sizes, also compressed (deflate of
the file, and a bitmask + non-zero int8 values estimate of the weights).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import re
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vitprune.errors import VitPruneError
from vitprune.utils.fs import atomic_path, check_writable_target

MODES = ("dynamic", "static")
EXCLUDE_GROUPS = ("patch_embed", "head", "attention", "mlp_fc2")
# static INT8 keeps the second MLP linear in fp32: its input (after GELU) has outliers that one per-tensor uint8
# range cannot hold (ViT-Tiny, tuning images: top-1 78.2 % with fc2 quantized, 87.5 % without, fp32 88.2 %)
DEFAULT_EXCLUDE = {"dynamic": ("patch_embed", "head"), "static": ("patch_embed", "head", "mlp_fc2")}
CALIB_METHODS = ("minmax", "entropy", "percentile")
STATIC_OPS = ("MatMul", "Conv", "Gemm")  # QDQ around the matrix products only: norms, GELU, softmax stay fp32
INSTALL_HINT = "pip install vitprune[onnx]"
_ATTN_INNER = re.compile(r"/attn/(MatMul(_\d+)?|Softmax)$")
_QUANT_OPS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}


def require_quantization() -> Any:
    """``onnxruntime.quantization``, or a one-line error."""
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization as q
    except ImportError:
        raise VitPruneError(f"--int8 needs onnxruntime.quantization (onnx + onnxruntime): {INSTALL_HINT}") from None
    return q


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _aliases(node: Any) -> list[str]:
    """The node's name, and the name quantize_dynamic gives a Gemm once it has rewritten it as MatMul + Add."""
    return [node.name, node.name + "_MatMul"] if node.op_type == "Gemm" else [node.name]


def resolve_exclude(graph: Any, exclude: Iterable[str]) -> list[str]:
    """Node names of ``graph`` (an ``onnx.GraphProto``) for the groups, node names or shell-style patterns
    (``*/mlp/fc2/*``) in ``exclude``."""
    nodes = list(graph.node)
    names = {n.name for n in nodes}
    outputs = {o.name for o in graph.output}
    out: list[str] = []
    for item in exclude:
        if item == "patch_embed":  # (quantize_dynamic rewrites a Gemm as NAME_MatMul before excluding)
            picked = [n.name for n in nodes if n.op_type == "Conv"]
        elif item == "head":
            heads = [
                n
                for n in nodes
                if n.op_type in ("Gemm", "MatMul") and (n.name.startswith("/head") or set(n.output) & outputs)
            ]
            picked = [m for n in heads for m in _aliases(n)]
        elif item == "attention":
            picked = [n.name for n in nodes if _ATTN_INNER.search(n.name)]
        elif item == "mlp_fc2":
            picked = [n.name for n in nodes if n.op_type in ("MatMul", "Gemm") and "/mlp/fc2/" in n.name]
        elif item in names:
            picked = [item]
        elif any(ch in item for ch in "*?["):  # a shell-style pattern over node names, e.g. */mlp/fc2/*
            picked = [m for n in nodes for m in _aliases(n) if fnmatch.fnmatchcase(n.name, item)]
            if not picked:
                raise VitPruneError(f"--keep-fp32 pattern {item!r} matches no node of the graph")
        else:
            raise VitPruneError(
                f"--keep-fp32 {item!r} is neither a node of the graph nor a group ({', '.join(EXCLUDE_GROUPS)})"
            )
        out += [p for p in picked if p not in out]
    return out


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (``DIR/<class>/<image>`` or flat), sorted."""
    from vitprune.data.imagefolder import IMG_EXTENSIONS, _image_files

    root = Path(folder)
    if not root.is_dir():
        raise VitPruneError(f"calibration folder not found: {root}")
    files = [str(f) for f in _image_files(root, IMG_EXTENSIONS)]
    if not files:
        raise VitPruneError(f"calibration folder {root} has no images ({', '.join(IMG_EXTENSIONS[:3])}, ...)")
    return files


def calibration_batches(
    folder: str | os.PathLike, transform: Any, num_images: int = 256, batch_size: int = 16
) -> list[np.ndarray]:
    """``num_images`` images spread evenly over the sorted files of ``folder`` (so over its classes), each
    prepared by ``transform`` (``PIL.Image -> (C, H, W)`` tensor), as float32 batches."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if num_images < 1 or batch_size < 1:
        raise VitPruneError(f"need calibration images >= 1 and batch >= 1, got {num_images}, {batch_size}")
    files = find_images(folder)
    n = min(num_images, len(files))
    picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
    tensors = []
    for path in picked:
        try:
            with Image.open(path) as img:
                tensors.append(transform(img.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise VitPruneError(f"cannot read calibration image {path}: {exc}") from None
    return [torch.stack(tensors[i : i + batch_size]).numpy() for i in range(0, n, batch_size)]


def _reader(batches: Sequence[np.ndarray], input_name: str) -> Any:
    q = require_quantization()

    class _BatchReader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._it = iter(batches)

    return _BatchReader()


def deflate_bytes(path: str | os.PathLike) -> int:
    """Size of the file compressed with zlib (deflate, level 6): what a zip of it would take."""
    return len(zlib.compress(Path(path).read_bytes(), 6))


def _initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def weight_zeros_report(fp32: Any, int8: Any, file_bytes: int) -> dict[str, Any]:
    """Check that zero fp32 weights are exact zeros in INT8, and estimate the bitmask + values size."""
    src, dst = _initializers(fp32), _initializers(int8)
    zeros_fp32 = kept = n_weights = 0
    int8_raw = int8_packed = 0
    for name, q in dst.items():
        if q.dtype not in (np.int8, np.uint8) or q.size < 16:
            continue
        int8_raw += q.nbytes
        int8_packed += (q.size + 7) // 8 + int(np.count_nonzero(q))
        base = name.removesuffix("_quantized")
        w = src.get(base)
        zp = dst.get(base + "_zero_point")
        if w is None or w.shape != q.shape or (zp is not None and np.any(zp != 0)):
            continue
        n_weights += 1
        zero = w == 0
        zeros_fp32 += int(zero.sum())
        kept += int((q[zero] == 0).sum())
    return {
        "int8_weight_tensors_checked": n_weights,
        "zero_weights_fp32": zeros_fp32,
        "zero_weights_kept": kept,
        "zeros_kept": kept == zeros_fp32,
        "int8_bitmask_bytes": file_bytes - int8_raw + int8_packed,
    }


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    mode: str = "dynamic",
    calib: Sequence[np.ndarray] | None = None,
    per_channel: bool = True,
    exclude: Iterable[str] | None = None,
    graph_prep: bool = True,
    calib_method: str = "minmax",
    reduce_range: bool = False,
    overwrite: bool = False,
    extra_metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Quantize the fp32 ONNX file ``fp32_path`` to INT8 at ``out_path`` (atomic; refused if it exists unless
    ``overwrite``). ``calib`` (static mode only, required there) is a list of float32 input batches; ``exclude``
    None keeps :data:`DEFAULT_EXCLUDE` of the mode in fp32.

    The vitprune metadata of the fp32 file is kept, plus ``vitprune_int8`` (this call's settings). Returns
    ``{"path", "mode", "fp32_file_bytes", "int8_file_bytes", "fp32_deflate_bytes", "int8_deflate_bytes",
    "int8_bitmask_bytes", "nodes_quantized", "quant_ops", "excluded", "zeros_kept", ...}``.
    """
    q = require_quantization()
    import onnx

    if mode not in MODES:
        raise VitPruneError(f"unknown INT8 mode {mode!r} (expected {' or '.join(MODES)})")
    if calib_method not in CALIB_METHODS:
        raise VitPruneError(f"unknown calibration method {calib_method!r} ({', '.join(CALIB_METHODS)})")
    exclude = tuple(DEFAULT_EXCLUDE[mode] if exclude is None else exclude)
    if mode == "static" and not calib:
        raise VitPruneError("--int8 static needs calibration images (--calib DIR)")
    src = Path(fp32_path)
    if not src.is_file():
        raise VitPruneError(f"ONNX file not found: {src}")
    target = check_writable_target(out_path, overwrite)
    fp32 = onnx.load(str(src))
    meta = {p.key: p.value for p in fp32.metadata_props}
    input_name = fp32.graph.input[0].name
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vitprune-int8-") as tmpdir:
        model_in = src
        if graph_prep:
            prepped = Path(tmpdir) / "prep.onnx"
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quant_pre_process(str(src), str(prepped))
                model_in = prepped
            except Exception as exc:  # shape inference / optimizer failures: quantize the graph as it is
                notes.append(f"quant_pre_process failed, skipped: {_first_line(exc)}")
        base = onnx.load(str(model_in))
        excluded = resolve_exclude(base.graph, exclude)
        graph_names = {n.name for n in base.graph.node}
        extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
        raw = Path(tmpdir) / "int8.onnx"
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # calibrators print
                warnings.simplefilter("ignore")
                if mode == "dynamic":
                    q.quantize_dynamic(
                        str(model_in),
                        str(raw),
                        per_channel=per_channel,
                        reduce_range=reduce_range,
                        weight_type=q.QuantType.QInt8,
                        nodes_to_exclude=excluded,
                        extra_options=extra,
                    )
                else:
                    method = {
                        "minmax": q.CalibrationMethod.MinMax,
                        "entropy": q.CalibrationMethod.Entropy,
                        "percentile": q.CalibrationMethod.Percentile,
                    }[calib_method]
                    q.quantize_static(
                        str(model_in),
                        str(raw),
                        _reader(calib, input_name),
                        quant_format=q.QuantFormat.QDQ,
                        per_channel=per_channel,
                        reduce_range=reduce_range,
                        activation_type=q.QuantType.QUInt8,
                        weight_type=q.QuantType.QInt8,
                        op_types_to_quantize=list(STATIC_OPS),
                        nodes_to_exclude=excluded,
                        calibrate_method=method,
                        extra_options=extra,
                    )
        except VitPruneError:
            raise
        except Exception as exc:
            raise VitPruneError(f"INT8 quantization failed: {_first_line(exc)}") from None
        int8 = onnx.load(str(raw))
        settings = {
            "mode": mode,
            "per_channel": per_channel,
            "excluded": list(exclude),
            "excluded_nodes": [n for n in excluded if n in graph_names],
            "graph_prep": graph_prep and model_in != src,
            "calib_method": calib_method if mode == "static" else None,
            "calib_images": int(sum(len(b) for b in calib)) if (mode == "static" and calib) else 0,
            "reduce_range": reduce_range,
            "onnxruntime": _ort_version(),
        }
        meta.update(extra_metadata or {})
        meta["vitprune_int8"] = json.dumps(settings)
        onnx.helper.set_model_props(int8, meta)
        ops = Counter(n.op_type for n in int8.graph.node)
        with atomic_path(target, overwrite=overwrite) as tmp:
            onnx.save(int8, str(tmp))
            from vitprune.runtime.ort import make_session

            make_session(tmp, threads=1)  # the runtime loads it
            int8_bytes = tmp.stat().st_size
            report = weight_zeros_report(base, int8, int8_bytes)
            int8_deflate = deflate_bytes(tmp)
    return {
        "path": str(target),
        **settings,
        "fp32_file_bytes": src.stat().st_size,
        "int8_file_bytes": int8_bytes,
        "fp32_deflate_bytes": deflate_bytes(src),
        "int8_deflate_bytes": int8_deflate,
        **report,
        "nodes_quantized": _count_quantized(int8),
        "quant_ops": {k: v for k, v in sorted(ops.items()) if k in _QUANT_OPS or k.startswith("QLinear")},
        "notes": notes,
    }


def _count_quantized(model: Any) -> int:
    """Compute nodes that run in INT8: integer MatMul/Conv (dynamic) or MatMul/Conv/Gemm whose inputs all come
    from DequantizeLinear nodes (QDQ)."""
    nodes = list(model.graph.node)
    dq_out = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    integer = [n for n in nodes if n.op_type in ("MatMulInteger", "ConvInteger") or n.op_type.startswith("QLinear")]
    qdq = [
        n
        for n in nodes
        if n.op_type in ("MatMul", "Conv", "Gemm") and len(n.input) >= 2 and all(i in dq_out for i in n.input[:2])
    ]
    return len(integer) + len(qdq)


def _ort_version() -> str | None:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None
