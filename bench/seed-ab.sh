#!/usr/bin/env bash
# The common recipe's QLoRA job unpacked through the product path, the planner counting QLoRA
# adapters in bf16 (rows of up to 7,424 tokens at 12Gi) against the rows it planned before
# (4,992 tokens, which the same planner now gives at 10.7Gi), alternated in one run;
# 24 optimizer steps of which 20 timed.
# Run from the repository root on the GPU machine:  bash bench/seed-ab.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: seed-ab.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
S="$SEED,\"training.packing\":false"
NEW="{\"label\":\"seed QLoRA job, 12Gi (rows of up to 7,424)\",\"manifest\":\"$L\",\"set\":{$S}}"
OLD="{\"label\":\"seed QLoRA job, rows of up to 4,992 (10.7Gi)\",\"manifest\":\"$L\",\"set\":{$S,\"resources.gpu.memory\":\"10.7Gi\"}}"
timeout 280 $B job --shape llama-3-8b --steps 24 --warmup 4 --out "$OUT_DIR/seed-ab.jsonl" \
  --job "$OLD" --job "$NEW" --job "$OLD" --job "$NEW" 2>&1 | grep -E "^job |Error|error" | cut -c1-240
