#!/usr/bin/env bash
# The FP8 base's speed over micro-batch tokens x checkpointing, for the planner's fp8 speed
# constants (bench/fit_speed_model.py --method fp8), with bf16 LoRA at three of the points on the
# same machine: Llama-3-8B shape, r 16 on every projection, dropout 0, one varlen row per
# micro-batch, 12 optimizer steps (4 not timed). Also runs the GPU tests of the FP8 quantiser.
# Run from the repository root on the GPU machine:  bash bench/fp8-speed-grid.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: fp8-speed-grid.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
python3 -m pytest tests/worker/test_perf_gpu.py --noconftest -o addopts="" -q -p no:cacheprovider 2>&1 | tail -3
OUT="$OUT_DIR/fp8-speed-grid.jsonl"
C='"varlen":true,"dropout":0.0,"grad_accum":1'
configs() {  # method, then "tokens:ckpt" pairs
  local method=$1; shift
  for point in "$@"; do
    local tokens=${point%:*} ckpt=${point#*:}
    echo "--config"
    echo "{\"label\":\"$method-$tokens-ckpt$ckpt\",$C,\"tokens_per_micro_batch\":$tokens,\"grad_ckpt\":$ckpt}"
  done
}
mapfile -t FP8 < <(configs fp8 4096:0 8192:0 12288:0 16384:0 4096:1 8192:1 16384:1)
mapfile -t LORA < <(configs lora 12288:0 8192:1 16384:1)
for method in fp8 lora; do
  if [ "$method" = fp8 ]; then args=("${FP8[@]}"); else args=("${LORA[@]}"); fi
  timeout 240 $B run --shape llama-3-8b --method "$method" --steps 12 --warmup 4 \
    --examples 4000 --out "$OUT" "${args[@]}" 2>&1 | grep -E "Error|error" | cut -c1-200
done
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:22} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>6} GiB "
          f"median step {r['step_s_median']:.3f} s {r.get('error')}")
PY
