"""Exporters: ONNX (:mod:`vitprune.export.onnx`, needs the ``onnx`` extra) and compressed sparse storage."""
