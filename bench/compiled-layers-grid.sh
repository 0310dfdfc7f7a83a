#!/usr/bin/env bash
# Compiled decoder layers (plan.compiledLayers) against eager at 2,048 and 16,384 tokens per
# row, every layer checkpointed: the seed's QLoRA rows (r 64, dropout 0.1, bf16 adapters as
# trl holds them), LoRA rows as the llama3 example trains them (r 16, dropout 0.05), and FP8
# rows as the 24 GiB benchmark plan (r 16, dropout 0, 16,384 tokens). Peaks give the memory
# model's term for compiled layers, step times the speed model's host constants (4,608-token
# rows: bench/compile-qlora.sh). Liger's in-layer kernels, once patched into a base, stay for
# the process, so in each process the compiled runs come first.
# Run from the repository root on the GPU machine:  bash bench/compiled-layers-grid.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: compiled-layers-grid.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/compiled-layers-grid.jsonl"
run() {  # method configs...
  local method=$1; shift
  local args=()
  for c in "$@"; do args+=(--config "$c"); done
  echo "== $(date +%T) $method"
  timeout 300 $B run --shape llama-3-8b --method "$method" --steps 12 --warmup 5 --examples 3000 \
    "${args[@]}" --out "$OUT" 2>&1 | grep -E "Error|error" | cut -c1-240
}
grid() {  # method label-prefix common-json tokens...
  local method=$1 prefix=$2 common=$3; shift 3
  local cfgs=()
  for mode in compiled eager; do
    for t in "$@"; do
      local extra=""
      [ $mode = compiled ] && extra=',"compile_layers":true'
      cfgs+=("{\"label\":\"$prefix-$t-$mode\",$common,\"tokens_per_micro_batch\":$t$extra}")
    done
  done
  run "$method" "${cfgs[@]}"
}
grid qlora qlora '"r":64,"alpha":16,"dropout":0.1,"varlen":true,"grad_ckpt":1,"seq_len":512,"bf16_adapters":true' 2048 16384
grid lora lora '"r":16,"alpha":32,"dropout":0.05,"varlen":true,"grad_ckpt":1,"seq_len":2048' 2048 16384
grid fp8 fp8 '"r":16,"alpha":32,"dropout":0.0,"varlen":true,"grad_ckpt":1,"seq_len":512' 16384
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    n = r["notes"]
    print(f"{r['label']:26} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>6} GiB "
          f"alloc {r['peak_allocated_bytes']/2**30:.2f} median {r['step_s_median']:.3f} s "
          f"dynamo {n.get('dynamo')} {r.get('error')}")
    print("   steps", n.get("step_seconds"), "losses", r["losses"][:3], r["losses"][-2:])
PY
