#!/usr/bin/env bash
# LoRA on an FP8 frozen base (`method: fp8`, worker/finetune_worker/fp8.py) against the bf16
# base, on the worker's training step (bench/finetune_bench/harness.py): Llama-3-8B shape,
# r 16 on every projection, one varlen row of 12,288 tokens without checkpointing (the 80 GiB
# benchmark's micro-batch), dropout 0, the same random base, adapters and data, 30 optimizer
# steps (the first 5 not timed) for throughput, peak memory and the loss curves; then FP8 at
# 8,192 tokens with every layer checkpointed (where a 12-16 GiB budget would put it).
# Run from the repository root on the GPU machine:  bash bench/fp8-base.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: fp8-base.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
C='"varlen":true,"grad_accum":1,"dropout":0.0'
for method in lora fp8; do
  args=(--config "{\"label\":\"llama-3-8b-$method-12288\",$C,\"grad_ckpt\":0,\"tokens_per_micro_batch\":12288}")
  if [ "$method" = fp8 ]; then
    args+=(--config "{\"label\":\"llama-3-8b-fp8-8192-ckpt\",$C,\"grad_ckpt\":1,\"tokens_per_micro_batch\":8192,\"steps\":10,\"warmup_excluded\":4}")
  fi
  timeout 200 $B run --shape llama-3-8b --method "$method" --steps 30 --warmup 5 \
    --examples 3000 --out "$OUT_DIR/fp8-base.jsonl" "${args[@]}" 2>&1 \
    | grep -E "^RESULT|Error|error" | cut -c1-200
done
python3 - "$OUT_DIR/fp8-base.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"{r['label']:32} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>7} GiB "
          f"{r.get('error')}")
by = {r["label"]: r for r in rows}
a, b = by.get("llama-3-8b-lora-12288"), by.get("llama-3-8b-fp8-12288")
if a and b:
    d = [abs(x - y) / x for x, y in zip(a["losses"], b["losses"])]
    print("loss lora:", [round(x, 4) for x in a["losses"]][::5])
    print("loss fp8: ", [round(x, 4) for x in b["losses"]][::5])
    print(f"largest relative loss difference {max(d):.4f}, last {d[-1]:.4f}")
PY
