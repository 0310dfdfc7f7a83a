#!/usr/bin/env bash
# The planner's choices on the product path (the operator's planner, the worker's trainer),
# for the jobs where its speed ranking used to cost most, each against the configuration the
# planner chose before (forced through the spec) and the best one that fitted then:
#   Llama-3-8B, 40Gi, seq 1024, batch 64, dropout 0.05, packing (now: a share of the layers
#   checkpointed); Llama-3.2-1B, 8Gi, seq 2048, batch 32, packing.
# Random weights of each shape, the benchmark's realistic-length data, 14 optimizer steps of
# which 10 timed. Run from the repository root on the GPU machine:
#   bash bench/planner-choices.sh OUT_DIR
set -u
OUT=${1:?usage: planner-choices.sh OUT_DIR}/planner-choices.jsonl
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
L=examples/finetunejob-llama3-8b.yaml
J8='"method":"lora","resources.gpu.memory":"40Gi","training.seqLength":1024,"training.batchSize":64,"lora.dropout":0.05,"training.packing":true'
timeout 330 $B job --shape llama-3-8b --out "$OUT" \
  --job "{\"label\":\"8B 40Gi seq 1024: the planner's choice\",\"manifest\":\"$L\",\"set\":{$J8}}" \
  --job "{\"label\":\"8B 40Gi seq 1024: micro-batch 2, no checkpointing (the old choice)\",\"manifest\":\"$L\",\"set\":{$J8,\"training.microBatchSize\":2,\"training.gradientCheckpointing\":\"off\"}}" \
  --job "{\"label\":\"8B 40Gi seq 1024: micro-batch 8, full checkpointing\",\"manifest\":\"$L\",\"set\":{$J8,\"training.microBatchSize\":8,\"training.gradientCheckpointing\":\"on\"}}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-220
J1='"method":"lora","resources.gpu.memory":"8Gi","training.seqLength":2048,"training.batchSize":32,"training.packing":true'
timeout 200 $B job --shape llama-3.2-1b --out "$OUT" \
  --job "{\"label\":\"1B 8Gi seq 2048: the planner's choice\",\"manifest\":\"$L\",\"set\":{$J1}}" \
  --job "{\"label\":\"1B 8Gi seq 2048: micro-batch 1, no checkpointing (the old choice)\",\"manifest\":\"$L\",\"set\":{$J1,\"training.microBatchSize\":1,\"training.gradientCheckpointing\":\"off\"}}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-220
