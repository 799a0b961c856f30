#!/usr/bin/env bash
# The paper's vanilla PD (top-0.95-100, tau 1, NLL = soft CE, alpha 1) on the quickstart's CPU
# models; same hardware and prerequisites as online_pd_tiny_student_from_tiny_teacher.sh.
# Teacher outputs travel as sparse top-p-k entries. Expected: lower *KD* loss, but a higher
# held-out LM loss than the baseline at this scale (truncation without tail; see docs/LOG.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
QS=runs/quickstart
CONFIG=examples/configs/quickstart_pd.yaml NPROC_PER_NODE=2 exec bash launch/torchrun.sh \
  --run_dir=runs/online_pd_vanilla_tiny_cpu --distill.loss=soft_ce \
  --distill.truncation=top-0.95-100 --distill.alpha.value=1.0 --distill.tau.value=1.0 \
  --distill.teacher.load=$QS/teacher --distill.teacher.tp=2 \
  --data.tokenizer_model=$QS/data/stdlib_tok --data.blend="[$QS/data/stdlib_text_document]" \
  --data.cache_dir=$QS/data/cache "$@"
