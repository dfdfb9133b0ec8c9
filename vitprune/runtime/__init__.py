"""Inference runtimes other than eager PyTorch: ONNX Runtime (:mod:`vitprune.runtime.ort`) and, optionally,
OpenVINO (:mod:`vitprune.runtime.openvino`). Both need optional extras; this package imports without them."""

RUNTIMES = ("torch", "onnxruntime", "openvino")
