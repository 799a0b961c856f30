#!/usr/bin/env bash
# Offline PD, GLM-4-9B -> 1.9B student, the paper's main pipeline on one node of 8x 80 GB GPUs:
#   STAGE=dump   run the frozen teacher once over the student's training data and store its
#                top-0.95-100 log-probs (teacher TP=2: 4 data-parallel replicas share shards);
#   STAGE=train  train the student from the store (PD* settings: top-0.95-50 cut from the
#                stored entries, tau 2, KLD, WSD-alpha), no teacher in memory.
#
#   STAGE=dump TEACHER=/models/glm-4-9b-hf DATA=/data/corpus_text_document \
#   STORE=/fast/logits/glm4_9b_top-0.95-100 bash examples/recipes/offline_pd_1.9b_from_glm4-9b.sh
#   STAGE=train TOKENIZER=/models/glm-4-9b-hf DATA=... STORE=... \
#   bash examples/recipes/offline_pd_1.9b_from_glm4-9b.sh
#
# TEACHER: the Hugging Face directory as downloaded (THUDM/glm-4-9b-hf), loaded directly, or a
# megatron_pd checkpoint; DATA tokenized with its tokenizer (tools/preprocess_data.py
# --tokenizer-model "$TEACHER"); TOKENIZER defaults to TEACHER.
#
# The dump reads the student's config (examples/configs/online_pd_1.9b_from_glm4-9b.yaml), so
# the store's dataset fingerprint is the one the student checks; keep data.*, seq_length and
# the train length the same in both stages. Rerun the dump after an interruption: it skips
# finished shards, rewrites damaged ones, and ends byte-identical to an uninterrupted dump.
# Sizes (estimates): 100B tokens x ~150 bytes/token (the paper's figure; the quickstart
# teacher measures 119) = ~15 TB. The dump costs one 9B forward per token (~18 GFLOP); every
# later student run skips it: ~60% of an online PD step's FLOPs at 1.9B (~11 GFLOP/token to
# train the student).
set -euo pipefail
: "${STAGE:?set STAGE=dump or STAGE=train}" "${DATA:?set DATA}"
TOKENIZER="${TOKENIZER:-${TEACHER:?set TOKENIZER (or TEACHER)}}"
: "${STORE:?set STORE (a directory on fast shared storage)}"
cd "$(dirname "$0")/../.."
CONFIG=examples/configs/online_pd_1.9b_from_glm4-9b.yaml
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
DATA_ARGS=(--data.blend="[$DATA]" --data.tokenizer_model="$TOKENIZER")
case "$STAGE" in
  dump)
    : "${TEACHER:?set TEACHER}"
    exec torchrun --standalone --nproc_per_node="$NPROC_PER_NODE" tools/dump_teacher_logits.py \
      --config "$CONFIG" --store "$STORE" "${DATA_ARGS[@]}" \
      --distill.teacher.load="$TEACHER" \
      --distill.teacher.tp=2 --distill.truncation=top-0.95-100 --batch-size 4 "$@" ;;
  train)
    CONFIG=$CONFIG NPROC_PER_NODE=$NPROC_PER_NODE exec bash launch/torchrun.sh \
      --run_dir=runs/offline_pd_1.9b_from_glm4-9b "${DATA_ARGS[@]}" \
      --distill.store="$STORE" "$@" ;;
  *) echo "STAGE must be dump or train, not $STAGE" >&2; exit 2 ;;
esac
