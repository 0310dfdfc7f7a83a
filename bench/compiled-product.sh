#!/usr/bin/env bash
# Compiled decoder layers on the product path (planner + the worker's trainer), A/B against
# the same plans run eager (plan_set compiled_layers false). Part "seed": the common recipe's
# QLoRA job (12Gi, r 64, dropout 0.1, seq 512, 16 examples per step, unpacked), compiled and
# eager alternated twice, each its own process (liger's in-layer kernels, once patched into a
# base, stay), then the llama3 example as written, packed and unpacked. Part "budgets": the
# benchmark job at 24Gi and 12Gi (bench/trainer-budgets.sh's, 13 steps, 3 not timed).
# Part "recompiles": the seed job compiled, twice, with Dynamo's recompilations logged.
# Run from the repository root on the GPU machine:
#   bash bench/compiled-product.sh OUT_DIR seed|budgets|recompiles
set -u
OUT_DIR=${1:?usage: compiled-product.sh OUT_DIR seed|budgets|recompiles}
PART=${2:?usage: compiled-product.sh OUT_DIR seed|budgets|recompiles}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
OUT="$OUT_DIR/compiled-product.jsonl"
job() {  # job-json...
  local args=()
  for j in "$@"; do args+=(--job "$j"); done
  echo "== $(date +%T)"
  timeout 300 $B job --shape llama-3-8b --steps 16 --warmup 5 --out "$OUT" "${args[@]}" 2>&1 \
    | tee -a "$OUT_DIR/compiled-product.log" | grep -E "^job |Error|error|[Rr]ecompil" | cut -c1-240
}
if [ "$PART" = seed ]; then
  S="\"manifest\":\"$L\",\"set\":{$SEED,\"training.packing\":false}"
  for round in 1 2; do
    job "{\"label\":\"seed QLoRA job, 12Gi, compiled $round\",$S}"
    job "{\"label\":\"seed QLoRA job, 12Gi, eager $round\",$S,\"plan_set\":{\"compiled_layers\":false}}"
  done
  job "{\"label\":\"llama3-8b example\",\"manifest\":\"$L\"}" \
    "{\"label\":\"llama3-8b example, packing false\",\"manifest\":\"$L\",\"set\":{\"training.packing\":false}}"
elif [ "$PART" = recompiles ]; then
  S="\"manifest\":\"$L\",\"set\":{$SEED,\"training.packing\":false}"
  for round in 1 2; do
    TORCH_LOGS=recompiles; export TORCH_LOGS; job "{\"label\":\"seed QLoRA job, 12Gi, dynamic compiled $round\",$S}"
  done
else
  echo "== $(date +%T)"
  timeout 400 $B trainer --memory 24Gi,12Gi --steps 13 --warmup 3 --out "$OUT" 2>&1 \
    | grep -E "^budget|RESULT|Error|error" | cut -c1-240
fi
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    plan = r.get("plan", {})
    print(f"{r.get('label', r.get('budget')):50} {r.get('tokens_per_s')} tok/s "
          f"{r.get('peak_total_GiB')} GiB (pred {plan.get('estimatedPeakBytes', 0)/2**30:.2f}) "
          f"compiled {plan.get('compiledLayers')} rows {plan.get('rowTokens')} "
          f"mb {plan.get('microBatchSize')}x{plan.get('gradientAccumulation')} {r.get('error')}")
    print("   steps", r.get("step_seconds") or r.get("notes", {}).get("step_seconds"))
PY
