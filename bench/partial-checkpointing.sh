#!/usr/bin/env bash
# Checkpointing only some decoder layers: throughput and peak memory of the configurations the
# planner now considers between no and full checkpointing (operator/finetune_operator/planner,
# `checkpointedLayers`). The points are those of bench/planner_regret.py's jobs: for each job,
# tokens per micro-batch and method, the fitting configuration that recomputes the fewest
# layers (the fastest of its kind), where the speed model puts it within 15 % of the planner's
# choice. Both the memory model and the speed model interpolate these points from their none
# and all terms; none of them was used to fit either model. The same worker training step as
# bench/speed-grid.sh (varlen rows, lean LoRA, liger, fused AdamW, r 16 on every projection,
# dropout 0.05); 9 optimizer steps per point, the first 3 not timed.
# Run from the repository root:  bash bench/partial-checkpointing.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: partial-checkpointing.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
V='"varlen":true,"grad_accum":1,"dropout":0.05,"grad_ckpt":1'
point() { # shape method tokens layers: appends one configuration to $args
  args+=(--config "{\"label\":\"$1-$2-$3-ckpt$4\",$V,\"tokens_per_micro_batch\":$3,\"ckpt_layers\":$4}")
}
run() { # shape method configs...
  local shape=$1 method=$2 limit=$3
  shift 3
  echo "== $shape $method ($(($# / 2)) points, at most $limit s)"
  timeout "$limit" $B run --shape "$shape" --method "$method" --steps 9 --warmup 3 \
    --examples 3000 --out "$OUT_DIR/partial-checkpointing.jsonl" "$@" 2>&1 \
    | grep -E "^RESULT|Error|error" | cut -c1-160
}
args=()
for p in "4096 4" "4096 8" "4096 28" "8192 4" "8192 16" "8192 20" "8192 24" "16384 28"; do
  read -r t k <<<"$p"
  point llama-3-8b lora "$t" "$k"
done
run llama-3-8b lora 240 "${args[@]}"
args=()
for p in "4096 4" "4096 16" "8192 4" "8192 12" "8192 16" "8192 24" "8192 28" "16384 12" \
  "16384 24" "16384 28"; do
  read -r t k <<<"$p"
  point llama-3-8b qlora "$t" "$k"
done
run llama-3-8b qlora 300 "${args[@]}"
args=()
for k in 2 6 8 10 12; do point llama-3.2-1b lora 16384 "$k"; done
run llama-3.2-1b lora 90 "${args[@]}"
args=()
for k in 6 10 12 14; do point llama-3.2-1b qlora 16384 "$k"; done
run llama-3.2-1b qlora 90 "${args[@]}"
python3 - "$OUT_DIR/partial-checkpointing.jsonl" <<'PY'
import json, sys
print(f"{'label':40} {'tok/s':>8} {'peak GiB':>9} error")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:40} {r['tokens_per_s']:>8.0f} {r['peak_total_GiB']:>9} {r.get('error')}")
PY
