#!/usr/bin/env bash
# GPU readiness report on one GPU, in under 8 minutes on an H200 (see tools/gpu_check.py).
#
#   bash tools/gpu_check.sh [OUT_JSON]        # default: gpu_check.json
#
# Needs the GPU extras (pip install -e ".[gpu]": triton, transformer-engine optional).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-gpu_check.json}"
cd "$REPO"
PYTHON="${PYTHON:-python}"
exec timeout 470 "$PYTHON" tools/gpu_check.py --out "$OUT"
