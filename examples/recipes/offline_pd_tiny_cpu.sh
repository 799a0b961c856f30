#!/usr/bin/env bash
# Offline PD on CPU (2 gloo ranks): dump the quickstart teacher's top-0.95-100 log-probs over
# a small slice of the stdlib corpus once, then train the tiny student from the store with
# another layout (TP=2, micro batch 4) and PD*'s narrower top-0.95-50 cut of the same store.
# Needs the quickstart's tokenizer and teacher (bash examples/quickstart.sh, or
# python tools/quickstart.py --seeds 1). Hardware: any 2-core machine, ~3 minutes.
# Expected: dump ~4-5k tokens/s, ~85 kept entries and ~120 bytes per token; the student
# trains at ~4-5k tokens/s with the store at a few % of the step time.
set -euo pipefail
cd "$(dirname "$0")/../.."
QS=runs/quickstart
OUT=${OUT:-runs/offline_pd_tiny_cpu}
PY=${PYTHON:-python}
TOK=$QS/data/stdlib_tok
STDLIB=$($PY -c "import os, sysconfig; print(os.path.join(sysconfig.get_paths()['stdlib'], 'email'))")
mkdir -p "$OUT"
[ -f "$OUT/data/text_document.idx" ] || $PY tools/preprocess_data.py --input "$STDLIB" \
  --pattern '*.py' --tokenizer-model "$TOK" --output-prefix "$OUT/data/text_document" --quiet
COMMON=(--config examples/configs/quickstart_pd.yaml --data.tokenizer_model="$TOK"
  --data.blend="[$OUT/data/text_document]" --data.cache_dir="$OUT/data/cache"
  --train.train_steps=60 --train.eval_interval=30)
# 1. dump (rerun to resume; damaged shards are rewritten)
torchrun --standalone --nproc_per_node=2 tools/dump_teacher_logits.py "${COMMON[@]}" \
  --store "$OUT/store" --distill.teacher.load=$QS/teacher --distill.truncation=top-0.95-100
$PY tools/inspect_logits.py "$OUT/store/train" --samples 1 --tokens 2 --tokenizer-model "$TOK"
# 2. train from the store: another layout, PD*'s top-0.95-50 cut from the stored entries
CONFIG=examples/configs/quickstart_pd.yaml NPROC_PER_NODE=2 exec bash launch/torchrun.sh \
  "${COMMON[@]:2}" --run_dir="$OUT/student" --distill.store="$OUT/store" \
  --distill.truncation=top-0.95-50 --distill.tail=true --parallel.tp=2 \
  --train.micro_batch_size=4 "$@"
