#!/usr/bin/env bash
# Quickstart on a fresh machine: install into .venv (first time only), then run the whole
# pipeline on the Python standard library source with 2 CPU ranks. Arguments go to
# tools/quickstart.py (e.g. --nproc 1, --workdir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import megatron_pd, megatron.core" 2>/dev/null; then
  bash tools/install.sh .venv
fi
exec .venv/bin/python tools/quickstart.py "$@"
