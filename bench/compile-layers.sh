#!/usr/bin/env bash
# torch.compile of each decoder layer against eager, at the 80 GiB benchmark's micro-batch
# (Llama-3-8B shape, LoRA r 16 on every projection, one varlen row of 12,288 tokens, no
# checkpointing, dropout 0), on the worker's training step (bench/finetune_bench/
# harness.py). 12 optimizer steps, the first 5 not timed (compilation happens in the first).
# The recorded run (compile-layers-h200.jsonl) compiled the layers with liger's kernels in
# them (Dynamo broke its graphs at each); "compile_layers" now runs the worker's compiled
# layers (plan.compiledLayers: PyTorch's own norm, RoPE and SwiGLU, dynamic graphs).
# Run from the repository root on the GPU machine:  bash bench/compile-layers.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: compile-layers.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
args=()
for d in 0.0; do
  C="\"varlen\":true,\"grad_accum\":1,\"dropout\":$d,\"grad_ckpt\":0,\"tokens_per_micro_batch\":12288"
  args+=(--config "{\"label\":\"llama-3-8b-lora-12288-d$d-eager\",$C}")
  args+=(--config "{\"label\":\"llama-3-8b-lora-12288-d$d-compiled\",$C,\"compile_layers\":true}")
done
timeout 200 $B run --shape llama-3-8b --method lora --steps 12 --warmup 5 --examples 3000 \
  --out "$OUT_DIR/compile-layers.jsonl" "${args[@]}" 2>&1 | grep -E "^RESULT|Error|error" | cut -c1-200
python3 - "$OUT_DIR/compile-layers.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:40} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>7} GiB "
          f"steps {r['notes'].get('step_seconds')} {r.get('error')}")
PY
