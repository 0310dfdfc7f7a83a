#!/usr/bin/env bash
# Unpacked steps in rows filled between two micro-batch sizes (plan.rowTokens) against the
# whole-micro-batch rows planned before: the common recipe's QLoRA job (12Gi, r 64, dropout
# 0.1, seq 512, 16 examples per step, packing false), planned by the operator's planner and
# trained by the worker's own trainer, 8B random weights, the benchmark's realistic-length
# data; 28 optimizer steps of which the first 4 are not timed, the two plans alternated twice.
# Run from the repository root on the GPU machine:  bash bench/row-budget.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: row-budget.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/row-budget.jsonl"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
SEED="$SEED,\"training.packing\":false"
FILLED="{\"label\":\"seed QLoRA job, 12Gi, rows filled (planner)\",\"manifest\":\"$L\",\"set\":{$SEED}}"
WHOLE="{\"label\":\"seed QLoRA job, 12Gi, micro-batch 8 (whole micro-batch rows)\",\"manifest\":\"$L\",\"set\":{$SEED,\"training.microBatchSize\":8}}"
for round in 1 2; do
  timeout 280 python3 -m finetune_bench.cli job --shape llama-3-8b --steps 28 --warmup 4 \
    --out "$OUT" --job "$FILLED" --job "$WHOLE" 2>&1 | grep -E "^job |Error|error" | cut -c1-240
  echo "round $round done"
done
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    plan = r["plan"]
    print(f"{r['label']:64} rows<={plan.get('rowTokens') or plan['microBatchSize'] * 512:>5} "
          f"{r['tokens_per_s']:>7.0f} tok/s peak {r['peak_total_GiB']} GiB "
          f"(predicted {plan['estimatedPeakBytes'] / 2**30:.2f})")
PY
