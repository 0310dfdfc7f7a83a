#!/usr/bin/env bash
# Host-side levers on a host-bound step: the seed's QLoRA job's rows (r 64, dropout 0.1,
# every layer checkpointed, one varlen row of 4,096 tokens per micro-batch) with PyTorch's
# default BLAS library, cuBLAS and cuBLASLt named explicitly, and gc.freeze() before the
# steps; each run 12 steps of which the first 4 are not timed, the four alternated twice.
# Run from the repository root on the GPU machine:  bash bench/host-levers.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: host-levers.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/host-levers.jsonl"
Q='"r":64,"alpha":16,"dropout":0.1,"varlen":true,"grad_ckpt":1,"tokens_per_micro_batch":4096'
args=()
for round in 1 2; do
  args+=(--config "{\"label\":\"default-$round\",$Q}")
  args+=(--config "{\"label\":\"cublas-$round\",$Q,\"blas_library\":\"cublas\"}")
  args+=(--config "{\"label\":\"cublaslt-$round\",$Q,\"blas_library\":\"cublaslt\"}")
  args+=(--config "{\"label\":\"gc-freeze-$round\",$Q,\"gc_freeze\":true}")
done
timeout 500 $B run --shape llama-3-8b --method qlora --steps 12 --warmup 4 --examples 3000 \
  --out "$OUT" "${args[@]}" 2>&1 | grep -E "Error|error" | cut -c1-200
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['label']:14} {r['tokens_per_s']:>8.0f} tok/s median step {r['step_s_median']:.3f} s "
          f"peak {r['peak_total_GiB']} GiB {r.get('error') or ''}")
PY
