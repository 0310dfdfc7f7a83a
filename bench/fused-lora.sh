#!/usr/bin/env bash
# Each LoRA projection as one autograd node (fused_lora.LoraProjection) against the lean
# module-by-module path, through the product path (planner + the worker's trainer, 8B random
# weights, the benchmark's realistic-length data), alternated so both meet the same host:
#   qlora: the common recipe's QLoRA job (12Gi, r 64, dropout 0.1, seq 512, 16 examples per
#          step, unpacked) and the benchmark job at 12Gi (QLoRA, r 16, dropout 0, packing,
#          batch 96), twice each;
#   lora:  examples/finetunejob-llama3-8b.yaml as written (24Gi, seq 2048, dropout 0.05).
# Run from the repository root on the GPU machine:  bash bench/fused-lora.sh OUT_DIR [qlora|lora]
set -u
OUT_DIR=${1:?usage: fused-lora.sh OUT_DIR [qlora|lora]}
WHICH=${2:-qlora}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/fused-lora.jsonl"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
OFF='"worker_switches":{"fusedLora":false}'
job() {  # label set-members [extra-members]
  echo "{\"label\":\"$1\",\"manifest\":\"$L\",\"set\":{$2}${3:+,$3}}"
}
if [ "$WHICH" = qlora ]; then
  S="$SEED,\"training.packing\":false"
  B12='"method":"qlora","lora.r":16,"lora.alpha":32,"lora.dropout":0.0,"training.seqLength":512,"training.batchSize":96,"training.packing":true,"resources.gpu.memory":"12Gi"'
  for round in 1 2; do
    timeout 590 python3 -m finetune_bench.cli job --shape llama-3-8b --steps 24 --warmup 4 \
      --out "$OUT" --job "$(job "seed QLoRA job, fused" "$S")" \
      --job "$(job "seed QLoRA job, module by module" "$S" "$OFF")" \
      --job "$(job "benchmark job 12Gi QLoRA, fused" "$B12")" \
      --job "$(job "benchmark job 12Gi QLoRA, module by module" "$B12" "$OFF")" 2>&1 \
      | grep -E "^job |Error|error" | cut -c1-240
    echo "round $round done"
  done
else
  timeout 590 python3 -m finetune_bench.cli job --shape llama-3-8b --steps 16 --warmup 4 \
    --out "$OUT" --job "$(job "llama3-8b example, fused" "")" \
    --job "$(job "llama3-8b example, module by module" "" "$OFF")" \
    --job "$(job "llama3-8b example, fused (again)" "")" 2>&1 \
    | grep -E "^job |Error|error" | cut -c1-240
fi
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    plan = r["plan"]
    print(f"{r['label']:48} {plan['method']:5} {r['tokens_per_s']:>7.0f} tok/s "
          f"peak {r['peak_total_GiB']} GiB (predicted {plan['estimatedPeakBytes'] / 2**30:.2f})")
PY
