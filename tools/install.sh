#!/usr/bin/env bash
# Create a virtual environment with everything megatron_pd needs (CPU torch by default).
#
#   bash tools/install.sh [VENV_DIR]        # default .venv
#
# TORCH_SPEC names the torch to install first (default: torch==2.13.0, the CPU build on this
# project's machines). A bare "torch" requirement would pull a multi-GB CUDA build, so torch is
# always installed before the package. On a GPU machine use e.g. TORCH_SPEC="torch==2.13.0"
# from the CUDA index and add the extras: pip install -e ".[gpu]".
set -euo pipefail
VENV_DIR="${1:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$VENV_DIR"
fi
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$VENV_DIR/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV_DIR/bin/python" -c "import torch, megatron.core, megatron_pd; print('installed: torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
