#!/usr/bin/env bash
# Install vitprune into .venv and run the demo on the embedded default (Fashion-MNIST ViT).
source "$(dirname "$0")/_env.sh" onnx
vitprune demo "$@"
