#!/usr/bin/env bash
# Online PD*, GLM-4-9B -> 1.9B student, the paper's settings (100B tokens, seq 4096, global
# batch 2048), on one node of 8x 80 GB GPUs (H100/H200/A100-80G); for several nodes use the
# .sbatch twin. Both models use the GLM-4 tokenizer (151,552 tokens).
#
#   TEACHER=/ckpt/glm4-9b_megatron_pd DATA=/data/corpus_text_document \
#   TOKENIZER=/data/glm4_tokenizer.model bash examples/recipes/online_pd_1.9b_from_glm4-9b.sh
#
# TEACHER: a megatron_pd run/checkpoint of the glm4-9b preset (Hugging Face import comes with
#   a later tool); DATA: megatron .bin/.idx prefix(es) made by tools/preprocess_data.py;
# TOKENIZER: the SentencePiece model that tokenized DATA.
# Expected (estimated from FLOPs, not yet measured here): ~35 GFLOP per token (1.9B training
# + 9B forward), ~10k tokens/s per GPU at 35% MFU, 100B tokens in ~14 days on 8 GPUs (~3.5
# days on 32). Held-out LM loss of a 1.9B model after 100B web tokens: roughly 2.0-2.4 nats.
set -euo pipefail
: "${TEACHER:?set TEACHER}" "${DATA:?set DATA}" "${TOKENIZER:?set TOKENIZER}"
cd "$(dirname "$0")/../.."
CONFIG=examples/configs/online_pd_1.9b_from_glm4-9b.yaml NPROC_PER_NODE="${NPROC_PER_NODE:-8}" \
  exec bash launch/torchrun.sh \
  --distill.teacher.load="$TEACHER" --distill.teacher.model.preset=glm4-9b \
  --data.blend="[$DATA]" --data.tokenizer_model="$TOKENIZER" "$@"
