#!/usr/bin/env bash
# The test suite on a fresh machine: install into the venv when anything is missing (first
# time only, as the quickstart does), then run pytest there. Arguments go to pytest (e.g.
# tests/unit, -k fuzz, --faults -m faults tests).
#
#   bash tools/test.sh                      # the suite CI runs, in .venv
#   VENV=.venv312 PYTHON=python3.12 bash tools/test.sh   # the Python 3.12 stack
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c \
    "import megatron_pd, megatron.core, pytest, hypothesis, transformers, lm_eval" 2>/dev/null; then
  bash tools/install.sh "$VENV"
fi
if [ "$#" -eq 0 ]; then
  set -- -q tests
fi
exec "$VENV/bin/python" -m pytest "$@"
