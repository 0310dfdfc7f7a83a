#!/usr/bin/env bash
# What users of the shipped examples get: each manifest as written (and the common recipe's
# QLoRA job, bench/reference/, labelled "seed"), planned by the operator's planner and trained
# by the worker's own preparation and trainer on one GPU, random weights of the model's shape,
# the benchmark's realistic-length data.
# 14 optimizer steps, the first 4 not timed. Run from the repository root on the GPU machine:
#   bash bench/shipped-examples.sh OUT_DIR
set -u
OUT=${1:?usage: shipped-examples.sh OUT_DIR}/shipped-examples.jsonl
B="python3 -m finetune_bench.cli job"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
timeout 420 $B --shape llama-3-8b --out "$OUT" \
  --job "{\"label\":\"llama3-8b example\",\"manifest\":\"$L\"}" \
  --job "{\"label\":\"llama3-8b example, packing false\",\"manifest\":\"$L\",\"set\":{\"training.packing\":false}}" \
  --job "{\"label\":\"seed QLoRA job, 12Gi\",\"manifest\":\"$L\",\"set\":{$SEED,\"training.packing\":false}}" \
  --job "{\"label\":\"seed QLoRA job, 12Gi, packing\",\"manifest\":\"$L\",\"set\":{$SEED,\"training.packing\":true}}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-200
M=examples/finetunejob-qlora.yaml
timeout 300 $B --shape mistral-7b --out "$OUT" \
  --job "{\"label\":\"mistral QLoRA example\",\"manifest\":\"$M\"}" \
  --job "{\"label\":\"mistral QLoRA example, planner's micro-batch and checkpointing\",\"manifest\":\"$M\",\"set\":{\"training.microBatchSize\":\"auto\",\"training.gradientCheckpointing\":\"auto\"}}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-200
