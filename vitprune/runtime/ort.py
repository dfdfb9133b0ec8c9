"""ONNX Runtime sessions, run like a torch model: the one place eval, bench and the latency table build them.

:class:`OrtModel` wraps an ``InferenceSession`` (CPU execution provider, ``intra_op_num_threads`` = the thread
count, graph optimisation level "all") in an ``nn.Module`` without parameters whose ``forward`` takes an image
tensor and returns the logits tensor, so that :func:`vitprune.metrics.evaluate.evaluate` and
:func:`vitprune.metrics.latency.compare_many` (round-robin timing) use it unchanged. The vitprune metadata
written at export (``vitprune_config``, ``vitprune_preprocess``, ``vitprune_int8``) is read back from the file.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitprune.errors import VitPruneError

INSTALL_HINT = "pip install vitprune[onnx]"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a one-line error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise VitPruneError(f"the ONNX Runtime path needs the 'onnxruntime' package: {INSTALL_HINT}") from None
    return onnxruntime


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def resolve_threads(threads: int | None) -> int:
    """``threads`` (>= 1), or torch's current intra-op thread count when None (what the torch path uses)."""
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise VitPruneError(f"threads must be >= 1, got {threads}")
    return int(threads)


def make_session(model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all") -> Any:
    """An ``InferenceSession`` on the CPU with ``threads`` intra-op threads (not spinning when idle), one inter-op
    thread, sequential execution and the given graph optimisation level."""
    ort = require_onnxruntime()
    if optimization not in OPTIMIZATION_LEVELS:
        raise VitPruneError(f"unknown graph optimisation level {optimization!r} ({', '.join(OPTIMIZATION_LEVELS)})")
    level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = resolve_threads(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    # no busy-waiting of idle intra-op threads: they would steal the cores from whatever runs next (the other
    # models of a round-robin comparison, torch's own threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        name = "the ONNX graph" if isinstance(model, bytes) else str(model)
        raise VitPruneError(f"onnxruntime cannot load {name}: {_first_line(exc)}") from None


def is_onnx_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (read with ``onnx`` without its weights, else with onnxruntime)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in model.metadata_props}
    except ImportError:
        return dict(make_session(path).get_modelmeta().custom_metadata_map)
    except Exception as exc:
        raise VitPruneError(f"cannot read ONNX file {path}: {_first_line(exc)}") from None


@dataclass
class InputSpec:
    """What an ONNX graph without vitprune metadata tells about its input (used as ``.config`` then)."""

    img_size: int | None
    in_chans: int
    num_classes: int | None
    preprocess: dict[str, Any] | None = None


def _dim(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and value > 0 else None


class OnnxRunner(nn.Module):
    """An ONNX model run by an inference runtime; ``forward(images) -> logits`` on CPU tensors.

    ``config`` is the exported model's :class:`~vitprune.models.config.ViTConfig` (from ``vitprune_config``)
    or an :class:`InputSpec` read from the graph's input shape; ``vit_config`` is the former or None.
    """

    runtime = "onnx"

    def __init__(self, path: str | os.PathLike | None, metadata: dict[str, str], input_shape: list[Any]) -> None:
        super().__init__()
        from vitprune.models.config import ViTConfig

        self.path = str(path) if path is not None else None
        self.metadata = dict(metadata)
        self.vit_config = None
        if "vitprune_config" in self.metadata:
            try:
                self.vit_config = ViTConfig.from_json(self.metadata["vitprune_config"])
            except Exception as exc:
                raise VitPruneError(f"{path}: bad vitprune_config metadata: {_first_line(exc)}") from None
        shape = list(input_shape) + [None] * (4 - len(input_shape))
        self.fixed_batch = _dim(shape[0])
        in_chans = _dim(shape[1]) or (self.vit_config.in_chans if self.vit_config else 3)
        size = _dim(shape[3]) or (self.vit_config.img_size if self.vit_config else None)
        if self.vit_config is not None:
            self.config: Any = self.vit_config
        else:
            self.config = InputSpec(size, in_chans, None)
        self.img_size, self.in_chans = size, in_chans

    @property
    def preprocess(self) -> dict[str, Any] | None:
        """The preprocessing recorded at export (``vitprune_preprocess``, else the config's), or None."""
        if "vitprune_preprocess" in self.metadata:
            return json.loads(self.metadata["vitprune_preprocess"])
        return self.vit_config.preprocess if self.vit_config is not None else None

    @property
    def int8(self) -> dict[str, Any] | None:
        """The quantization record written by :func:`vitprune.export.quantize.quantize_onnx`, or None."""
        return json.loads(self.metadata["vitprune_int8"]) if "vitprune_int8" in self.metadata else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise VitPruneError(f"{self.path} has a fixed batch of {self.fixed_batch}; got {x.shape[0]} images")
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self._run(arr)))


class OrtModel(OnnxRunner):
    """An ONNX file (or serialized graph) in an ONNX Runtime session; see :func:`make_session`."""

    runtime = "onnxruntime"

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all") -> None:
        self.threads = resolve_threads(threads)
        session = make_session(model, self.threads, optimization)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise VitPruneError(f"expected a graph with one image input, got {len(inputs)} inputs")
        super().__init__(None if isinstance(model, bytes) else model, meta, list(inputs[0].shape))
        self.session = session
        self.input_name, self.output_name = inputs[0].name, outputs[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]


def module_to_onnx_bytes(module: nn.Module, example: torch.Tensor, opset: int = 17) -> bytes:
    """Serialize ``module`` (traced on ``example``, fixed shapes) with torch's TorchScript-based exporter."""
    import warnings

    from vitprune.export.onnx import _legacy_exporter_kwargs

    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                (example,),
                buf,
                **_legacy_exporter_kwargs(),
                opset_version=opset,
                input_names=["x"],
                output_names=["y"],
                do_constant_folding=True,
            )
    except Exception as exc:
        raise VitPruneError(f"ONNX export failed: {_first_line(exc)}") from None
    return buf.getvalue()


def module_session(module: nn.Module, example: torch.Tensor, threads: int | None = None) -> OrtModel:
    """``module`` exported in memory and loaded in an ONNX Runtime session (used by the latency table)."""
    return OrtModel(module_to_onnx_bytes(module, example), threads=threads)


def load_runner(path: str | os.PathLike, runtime: str = "onnxruntime", threads: int | None = None) -> OnnxRunner:
    """An ONNX file run by ``runtime`` ("onnxruntime" or "openvino")."""
    p = Path(path)
    if not p.is_file():
        raise VitPruneError(f"ONNX file not found: {p}")
    if runtime == "onnxruntime":
        return OrtModel(p, threads=threads)
    if runtime == "openvino":
        from vitprune.runtime.openvino import OpenVinoModel

        return OpenVinoModel(p, threads=threads)
    raise VitPruneError(f"an ONNX file runs with --runtime onnxruntime or openvino, not {runtime!r}")
