#!/usr/bin/env bash
# Install vitprune with its dev extras into .venv, then run ruff and the whole test suite.
source "$(dirname "$0")/_env.sh" "dev,onnx,bench"
ruff check .
ruff format --check .
python -m pytest -q -p no:cacheprovider "$@"
