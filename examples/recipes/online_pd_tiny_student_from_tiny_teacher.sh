#!/usr/bin/env bash
# Online PD on CPU (2 gloo ranks): the quickstart's tiny-student distilled from its
# tiny-teacher on the Python stdlib corpus. Hardware: any 2-core machine, ~3 minutes.
# Needs the quickstart's data and teacher (bash examples/quickstart.sh, or
# python tools/quickstart.py --seeds 1). Expected: held-out LM loss ~4.8 after 150 steps vs
# ~5.0 for the LM-only baseline; ~2,000-2,500 tokens/s, teacher forward ~55-65% of a step.
set -euo pipefail
cd "$(dirname "$0")/../.."
QS=runs/quickstart
CONFIG=examples/configs/quickstart_pd.yaml NPROC_PER_NODE=2 exec bash launch/torchrun.sh \
  --run_dir=runs/online_pd_tiny_cpu --distill.teacher.load=$QS/teacher \
  --data.tokenizer_model=$QS/data/stdlib_tok --data.blend="[$QS/data/stdlib_text_document]" \
  --data.cache_dir=$QS/data/cache "$@"
