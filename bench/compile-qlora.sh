#!/usr/bin/env bash
# torch.compile of each decoder layer where the step is host-bound: the seed's QLoRA rows (r 64,
# dropout 0.1, every layer checkpointed, bf16 adapters as trl's trainer holds them, one varlen
# row of 4,608 tokens: the size of its typical step) and the unpacked llama3 example's rows
# (LoRA r 16, dropout 0.05, every layer checkpointed, 4,608 tokens). Eager with liger's
# kernels (the worker today) against compiled layers with PyTorch's own norm, RoPE and SwiGLU
# (liger's kernels cannot be traced; Inductor fuses their work instead) and liger's fused loss
# either way: the plan's compiledLayers, modeling.compile_decoder_layers). Each variant is its
# own process (liger patches the base in place), the QLoRA pair alternated twice. 16 optimizer
# steps, the first 6 not timed (compilation). The recorded run (compile-qlora-h200.jsonl)
# compiled a static graph first and a dynamic one at the first new row shape (compiled runs'
# step 0 and step 3); the worker now compiles dynamic graphs from the start.
# Run from the repository root on the GPU machine:  bash bench/compile-qlora.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: compile-qlora.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/compile-qlora.jsonl"
run() {  # method config-json
  echo "== $(date +%T) $2" | cut -c1-160
  timeout 420 $B run --shape llama-3-8b --method "$1" --steps 16 --warmup 6 --examples 3000 \
    --config "$2" --out "$OUT" 2>&1 | grep -E "^RESULT|Error|error" | cut -c1-240
}
Q='"r":64,"alpha":16,"dropout":0.1,"varlen":true,"grad_ckpt":1,"seq_len":512,"bf16_adapters":true,"tokens_per_micro_batch":4608'
L='"r":16,"alpha":32,"dropout":0.05,"varlen":true,"grad_ckpt":1,"seq_len":2048,"tokens_per_micro_batch":4608'
COMPILED='"compile_layers":true'
for round in 1 2; do
  run qlora "{\"label\":\"qlora-4608-eager-$round\",$Q}"
  run qlora "{\"label\":\"qlora-4608-compiled-$round\",$Q,$COMPILED}"
done
run lora "{\"label\":\"lora-4608-eager\",$L}"
run lora "{\"label\":\"lora-4608-compiled\",$L,$COMPILED}"
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    n = r["notes"]
    print(f"{r['label']:28} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>6} GiB "
          f"median {r['step_s_median']:.3f} s dynamo {n.get('dynamo')} {r.get('error')}")
    print("   steps", n.get("step_seconds"), "losses", r["losses"][:4], r["losses"][-2:])
PY
