#!/usr/bin/env bash
# Single-node launch of megatron_pd.train (the twin of slurm/node_entry.sh).
#
#   CONFIG=examples/configs/tiny_lm.yaml NPROC_PER_NODE=2 bash launch/torchrun.sh \
#       --parallel.tp=2 --run_dir=runs/tiny_tp2
#
# Environment:
#   CONFIG          YAML config (required)
#   NPROC_PER_NODE  ranks on this machine (default: number of GPUs, else 2)
#   SITE_ENV        launch/env/<SITE_ENV>.sh to source (default: cpu without GPUs, else gpu)
#   MASTER_PORT     rendezvous port (default 29500)
# Arguments are config overrides (--section.field=value), passed to every rank.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${CONFIG:?set CONFIG to a YAML config, e.g. CONFIG=examples/configs/tiny_lm.yaml}"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}"
SITE_ENV="${SITE_ENV:-$([ "$GPUS" -gt 0 ] && echo gpu || echo cpu)}"
MASTER_PORT="${MASTER_PORT:-29500}"
# shellcheck source=/dev/null
source "$REPO/launch/env/${SITE_ENV}.sh"
cd "$REPO"
# Validate config, topology and data in one process first: one clear error line, no GPUs used.
python -m megatron_pd.train --config "$CONFIG" --dry-run --world-size "$NPROC_PER_NODE" "$@"
exec python -m megatron_pd.launch --standalone --nproc_per_node="$NPROC_PER_NODE" \
  --master_port="$MASTER_PORT" \
  -m megatron_pd.train --config "$CONFIG" "$@"
