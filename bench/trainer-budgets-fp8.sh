#!/usr/bin/env bash
# The benchmark job of trainer-budgets.sh with `resources.gpu.product: NVIDIA-H200`, so that
# `method: auto` may choose the FP8 base where the planner ranks it fastest: the product path
# (planner + worker's trainer), 23 optimizer steps of which 20 timed, at 80 / 48 / 24 GiB
# (12 GiB stays QLoRA, trainer-budgets.sh). Committed: bench/data/trainer-budgets-fp8-h200.jsonl.
# Run from the repository root on the GPU machine:  bash bench/trainer-budgets-fp8.sh OUT_DIR
set -u
OUT=${1:?usage: trainer-budgets-fp8.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh" || exit 1
timeout 400 $B trainer --memory 80Gi,48Gi,24Gi --gpu-product NVIDIA-H200 \
  --out "$OUT/trainer-budgets-fp8.jsonl" 2>&1 | grep -E "Error|error" | cut -c1-300
python3 - "$OUT/trainer-budgets-fp8.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    p = r["plan"]
    print(f"{r['memory']:5} {p['method']:5} mb {p['microBatchSize']} ckpt {p['gradientCheckpointing']}"
          f" {r.get('tokens_per_s', 0):>8.0f} tok/s peak {r.get('peak_total_GiB')} GiB"
          f" predicted {p['estimatedPeakBytes'] / 2**30:.2f} GiB losses {[round(x, 3) for x in r.get('losses', [])][::5]}")
PY
