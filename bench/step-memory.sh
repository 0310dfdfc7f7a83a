#!/usr/bin/env bash
# What a training step adds to what it starts with, step by step, through the product path
# (planner + the worker's trainer, 8B random weights, the benchmark's realistic-length data):
# the allocator's bytes at each optimizer step's start (weights, adapters, optimizer state)
# and its peak allocated and reserved bytes in the step, against the step's real tokens.
#   the common recipe's QLoRA job (r 64, dropout 0.1, seq 512, 16 examples per step)
#   unpacked at 12.5Gi (rows of up to 5,888 tokens), the same with dropout 0, and packed at
#   12Gi (two micro-batches of 8 x 512 tokens: the second one's with the first's gradients);
#   the benchmark job at 12Gi (QLoRA r 16, dropout 0, packing, batch 96) as the control.
# Run from the repository root on the GPU machine:  bash bench/step-memory.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: step-memory.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/step-memory.jsonl"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
j() {  # label set-members
  echo "{\"label\":\"$1\",\"manifest\":\"$L\",\"set\":{$2},\"step_memory\":true}"
}
U="$SEED,\"training.packing\":false,\"resources.gpu.memory\":\"12.5Gi\""
B12='"method":"qlora","lora.r":16,"lora.alpha":32,"lora.dropout":0.0,"training.seqLength":512,"training.batchSize":96,"training.packing":true,"resources.gpu.memory":"12Gi"'
timeout 590 python3 -m finetune_bench.cli job --shape llama-3-8b --steps 14 --warmup 2 --out "$OUT" \
  --job "$(j "seed QLoRA job unpacked, 12.5Gi" "$U")" \
  --job "$(j "seed QLoRA job unpacked, 12.5Gi, dropout 0" "$U,\"lora.dropout\":0.0")" \
  --job "$(j "seed QLoRA job packed, 12Gi" "$SEED,\"training.packing\":true")" \
  --job "$(j "benchmark job 12Gi QLoRA" "$B12")" 2>&1 | grep -E "^job |Error|error" | cut -c1-240
python3 - "$OUT" <<'PY'
import json, sys
G = 2**30
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']}: peak reserved {r['peak_reserved_bytes'] / G:.2f} GiB, "
          f"predicted {(r['predicted_peak_bytes']) / G:.2f} with context")
    for tokens, (start, peak, reserved) in zip(r["real_tokens_per_step"], r["step_memory"]):
        print(f"  {tokens:>6} tokens  start {start / G:6.2f}  +{(peak - start) / G:5.2f} GiB"
              f"  peak {peak / G:6.2f}  reserved {reserved / G:6.2f}")
PY
