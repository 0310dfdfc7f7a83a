#!/usr/bin/env bash
# QLoRA plans counted with bf16 adapters (planner/memory.py WORKER_ADAPTER_BYTES: trl's
# SFTTrainer casts QLoRA adapters to bf16, so gradients and AdamW state are bf16 too):
#   1. the common recipe's QLoRA job unpacked at 12Gi through the product path (planner +
#      the worker's trainer, realistic lengths; 24 optimizer steps, 20 timed): the rows the
#      planner now allows, tokens/s and peak against the prediction;
#   2. the worst case of that plan, which realistic data never reaches: every row full, in the
#      bench loop (`finetune-bench run`, one varlen row of exactly the plan's row budget per
#      step, adapters cast to bf16 as trl does; 8 steps), peak against the prediction.
# Run from the repository root on the GPU machine:  bash bench/qlora-bf16-adapters.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: qlora-bf16-adapters.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
OUT="$OUT_DIR/qlora-bf16-adapters.jsonl"
S="$SEED,\"training.packing\":false"
timeout 300 $B job --shape llama-3-8b --steps 24 --warmup 4 --out "$OUT" \
  --job "{\"label\":\"seed QLoRA job, 12Gi\",\"manifest\":\"$L\",\"set\":{$S},\"step_memory\":true}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-240
ROW=$(python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1]["plan"]["rowTokens"])' "$OUT")
C="{\"label\":\"full rows of $ROW tokens, bf16 adapters\",\"r\":64,\"alpha\":16,\"dropout\":0.1,\"varlen\":true,\"grad_ckpt\":1,\"bf16_adapters\":true,\"tokens_per_micro_batch\":$ROW}"
timeout 250 $B run --shape llama-3-8b --method qlora --steps 8 --warmup 3 --examples 3000 \
  --config "$C" --out "$OUT" 2>&1 | grep -E "Error|error" | cut -c1-200
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "plan" in r:
        print(f"{r['label']}: rows of up to {r['plan']['rowTokens']}, {r['tokens_per_s']:.0f} "
              f"tokens/s, peak {r['peak_total_GiB']} GiB, predicted "
              f"{r['plan']['estimatedPeakBytes'] / 2**30:.2f}, real tokens per step "
              f"{min(r['real_tokens_per_step'])}-{max(r['real_tokens_per_step'])}")
    else:
        print(f"{r['config']['label']}: {r['tokens_per_s']:.0f} tokens/s, peak reserved "
              f"{r['peak_reserved_bytes'] / 2**30:.2f} GiB + {r['non_torch_bytes'] / 2**30:.2f} "
              f"outside the allocator {r.get('error') or ''}")
PY
