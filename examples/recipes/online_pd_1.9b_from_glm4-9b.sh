#!/usr/bin/env bash
# Online PD*, GLM-4-9B -> 1.9B student, the paper's settings (100B tokens, seq 4096, global
# batch 2048), on one node of 8x 80 GB GPUs (H100/H200/A100-80G); for several nodes use the
# .sbatch twin. Both models use the GLM-4 tokenizer (151,552 tokens).
#
#   TEACHER=/models/glm-4-9b-hf DATA=/data/corpus_text_document \
#   bash examples/recipes/online_pd_1.9b_from_glm4-9b.sh
#
# TEACHER: the Hugging Face directory as downloaded (THUDM/glm-4-9b-hf: config.json,
#   model-0000N-of-0000M.safetensors, tokenizer.json), loaded directly - each teacher rank
#   reads its own TP slices of the safetensors - or a megatron_pd run/checkpoint;
# DATA: megatron .bin/.idx prefix(es) tokenized with the teacher's tokenizer:
#   python tools/preprocess_data.py --input corpus/ --pattern '*.jsonl' \
#     --tokenizer-model "$TEACHER" --output-prefix /data/corpus_text_document --workers 32
# TOKENIZER: defaults to the teacher directory (its tokenizer.json).
# Expected (estimated from FLOPs, not yet measured here): ~35 GFLOP per token (1.9B training
# + 9B forward), ~10k tokens/s per GPU at 35% MFU, 100B tokens in ~14 days on 8 GPUs (~3.5
# days on 32). Held-out LM loss of a 1.9B model after 100B web tokens: roughly 2.0-2.4 nats.
set -euo pipefail
: "${TEACHER:?set TEACHER}" "${DATA:?set DATA}"
TOKENIZER="${TOKENIZER:-$TEACHER}"
cd "$(dirname "$0")/../.."
CONFIG=examples/configs/online_pd_1.9b_from_glm4-9b.yaml NPROC_PER_NODE="${NPROC_PER_NODE:-8}" \
  exec bash launch/torchrun.sh \
  --distill.teacher.load="$TEACHER" \
  --data.blend="[$DATA]" --data.tokenizer_model="$TOKENIZER" "$@"
