# Sourced by scripts/*.sh: create/refresh .venv with vitprune installed (CPU torch pinned on this machine kind).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_SPEC="${VITPRUNE_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${1:-onnx}"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "warning: could not install Debian package dataset-fashion-mnist" >&2
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
python -c "import vitprune, torch; print(f'vitprune {vitprune.__version__}, torch {torch.__version__}')"
