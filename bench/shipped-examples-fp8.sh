#!/usr/bin/env bash
# The llama3 example as written, and with packing left at its default, on a cluster whose
# FineTuneJob names its GPU product (`resources.gpu.product: NVIDIA-H200`): what `method: auto`
# gives when it may choose the FP8 base. Otherwise as shipped-examples.sh (planner + worker's
# preparation and trainer, random weights of the model's shape, 14 steps, 4 not timed).
# Run from the repository root on the GPU machine:  bash bench/shipped-examples-fp8.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: shipped-examples-fp8.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
L=examples/finetunejob-llama3-8b.yaml
P='"resources.gpu.product":"NVIDIA-H200"'
timeout 240 $B job --shape llama-3-8b --out "$OUT_DIR/shipped-examples-fp8.jsonl" \
  --job "{\"label\":\"llama3-8b example, H200 product\",\"manifest\":\"$L\",\"set\":{$P}}" \
  --job "{\"label\":\"llama3-8b example, H200 product, packing false\",\"manifest\":\"$L\",\"set\":{$P,\"training.packing\":false}}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-200
