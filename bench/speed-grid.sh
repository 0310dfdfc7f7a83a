#!/usr/bin/env bash
# Throughput over micro-batch tokens x checkpointing x method x model size, for the planner's
# speed model (operator/finetune_operator/planner/speed.py). One H200; the worker's own
# training step (varlen padding-free rows, lean LoRA, liger kernels, fused AdamW), r=16 on
# every projection, realistic example lengths, the API's default LoRA dropout (0.05), plus
# dropout 0 at two sizes. 12 optimizer steps per point, the first 4 not timed.
# Run from the repository root with the worker's packages importable:
#   bash bench/speed-grid.sh OUT_DIR [SHAPES]     (default: "llama-3.2-1b llama-3-8b")
set -u
OUT_DIR=${1:?usage: speed-grid.sh OUT_DIR [SHAPES]}
SHAPES=${2:-llama-3.2-1b llama-3-8b}
B="python3 -m finetune_bench.cli"
V='"varlen":true,"grad_accum":1,"dropout":0.05'
for shape in $SHAPES; do
  for method in lora qlora; do
    configs=()
    for t in 1024 2048 4096 8192 16384; do
      for ck in 0 1; do
        configs+=(--config "{\"label\":\"$shape-$method-$t-ck$ck\",$V,\"tokens_per_micro_batch\":$t,\"grad_ckpt\":$ck}")
      done
    done
    if [ "$method" = lora ]; then
      for t in 2048 8192; do
        configs+=(--config "{\"label\":\"$shape-$method-$t-ck0-nodrop\",\"varlen\":true,\"grad_accum\":1,\"dropout\":0.0,\"tokens_per_micro_batch\":$t,\"grad_ckpt\":0}")
      done
    fi
    echo "== $shape $method (${#configs[@]} points)"
    timeout 300 $B run --shape "$shape" --method "$method" --steps 12 --warmup 4 \
      --examples 3000 --out "$OUT_DIR/speed-grid.jsonl" "${configs[@]}" 2>&1 \
      | grep -E "^RESULT|Error|error" | cut -c1-160
  done
done
python3 - "$OUT_DIR/speed-grid.jsonl" <<'PY'
import json, sys
print(f"{'label':40} {'tok/s':>8} {'peak GiB':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:40} {r['tokens_per_s']:>8.0f} {r['peak_total_GiB']:>9}")
PY
