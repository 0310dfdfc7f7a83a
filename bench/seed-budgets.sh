#!/usr/bin/env bash
# The common recipe's QLoRA job unpacked (r 64, dropout 0.1, seq 512, 16 examples per step)
# at three GPU memory budgets through the product path (planner + the worker's trainer, 8B
# random weights, the benchmark's realistic-length data; 24 optimizer steps of which 20 timed):
# 12Gi (the planner fills rows of up to 4,992 tokens), 12.5Gi (5,888) and 14Gi (one row of
# up to 8,192 per step), one after the other in one run.
# Run from the repository root on the GPU machine:  bash bench/seed-budgets.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: seed-budgets.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
S="$SEED,\"training.packing\":false"
j() { echo "{\"label\":\"$1\",\"manifest\":\"$L\",\"set\":{$S$2}}"; }
timeout 580 python3 -m finetune_bench.cli job --shape llama-3-8b --steps 24 --warmup 4 \
  --out "$OUT_DIR/seed-budgets.jsonl" \
  --job "$(j 'seed QLoRA job, 12Gi (rows of up to 4,992)' '')" \
  --job "$(j 'seed QLoRA job, 12.5Gi (rows of up to 5,888)' ',"resources.gpu.memory":"12.5Gi"')" \
  --job "$(j 'seed QLoRA job, 14Gi (one row per step)' ',"resources.gpu.memory":"14Gi"')" 2>&1 \
  | grep -E "^job |Error|error" | cut -c1-240
