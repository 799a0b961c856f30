#!/usr/bin/env bash
# Per-node entry of a SLURM job: one torchrun per node, rendezvous from SLURM's variables.
# Started by `srun` in the .sbatch files (one task per node); not meant to be run by hand.
#
# Environment (set in the .sbatch or exported before sbatch):
#   CONFIG          YAML config (required unless CONFIG_LIST)
#   CONFIG_LIST     a job array's list: line N+1 is task N's "CONFIG [arguments...]"
#                   (python -m megatron_pd.explore --emit-slurm writes these)
#   ENTRY           what torchrun starts (default: -m megatron_pd.train; a sweep's dumps
#                   use tools/dump_teacher_logits.py)
#   GPUS_PER_NODE   ranks per node (default 8)
#   SITE_ENV        launch/env/<SITE_ENV>.sh with the site's NCCL/network settings (default gpu)
#   MASTER_PORT     rendezvous port on the first node (default 29500)
#   REPO            checkout of megatron_pd (default: two levels above this script)
# Arguments are config overrides, forwarded to every rank.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "$0")/../.." && pwd)}"
TASK_ARGS=()
if [ -n "${CONFIG_LIST:-}" ]; then
  : "${SLURM_ARRAY_TASK_ID:?CONFIG_LIST needs a job array (sbatch --array)}"
  read -r -a TASK_ARGS <<< "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$CONFIG_LIST")"
  CONFIG="${TASK_ARGS[0]:?no line $((SLURM_ARRAY_TASK_ID + 1)) in $CONFIG_LIST}"
  TASK_ARGS=("${TASK_ARGS[@]:1}")
fi
: "${CONFIG:?set CONFIG}"
ENTRY="${ENTRY:--m megatron_pd.train}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
SITE_ENV="${SITE_ENV:-gpu}"
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${SLURM_NNODES:?not inside a SLURM allocation}"
NODE_RANK="${SLURM_NODEID:?not inside a SLURM allocation}"
# shellcheck source=/dev/null
source "$REPO/launch/env/${SITE_ENV}.sh"
cd "$REPO"
if [ "$NODE_RANK" = "0" ] && [ "$ENTRY" = "-m megatron_pd.train" ]; then
  python -m megatron_pd.train --config "$CONFIG" --dry-run \
    --world-size "$((NNODES * GPUS_PER_NODE))" "$@"
fi
# shellcheck disable=SC2086  # ENTRY is "-m module" or a script path: split on purpose
exec python -m megatron_pd.launch --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="${SLURM_JOB_ID}" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  $ENTRY --config "$CONFIG" "${TASK_ARGS[@]}" "$@"
