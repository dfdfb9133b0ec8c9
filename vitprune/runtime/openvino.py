"""OpenVINO (optional ``vitprune[openvino]`` extra): run an exported ONNX file like :class:`~.ort.OrtModel`.

OpenVINO reads the ONNX file directly (fp32, or the QDQ INT8 graph of ``--int8 static``) and compiles it for the
CPU with ``INFERENCE_NUM_THREADS`` = the thread count and the latency performance hint.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vitprune.errors import VitPruneError
from vitprune.runtime.ort import OnnxRunner, _first_line, read_metadata, resolve_threads

INSTALL_HINT = "pip install vitprune[openvino]"


def require_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise VitPruneError(f"--runtime openvino needs the 'openvino' package: {INSTALL_HINT}") from None
    return openvino


class OpenVinoModel(OnnxRunner):
    """An ONNX file compiled by OpenVINO for the CPU."""

    runtime = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ov = require_openvino()
        self.threads = resolve_threads(threads)
        try:
            core = ov.Core()
            graph = core.read_model(str(path))
            shape = [d.get_length() if d.is_static else None for d in graph.inputs[0].get_partial_shape()]
            compiled = core.compile_model(
                graph, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
            )
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
            raise VitPruneError(f"OpenVINO cannot compile {path}: {_first_line(exc)}") from None
        super().__init__(path, read_metadata(path), shape)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[self.output].copy()
