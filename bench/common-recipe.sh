#!/usr/bin/env bash
# The common recipe (peft + trl SFTTrainer, micro-batch 1 x accumulation 4, seq 512,
# paged AdamW, dropout 0.1; bench/reference/README.md) on the benchmark's realistic-length
# data, and the loss-curve check against the worker's loop (docs/benchmarks.md):
#   1. the recipe, LoRA r=16 (30 optimizer steps) and QLoRA r=64 (28), 5 steps not timed;
#   2. the check: the recipe with dropout 0 and torch AdamW, and the worker's loop on the same
#      4 examples per step as one varlen row, 25 steps each; per-step losses compared.
# Committed (one H200): bench/data/common-recipe-same-data-h200.jsonl (1),
# bench/data/loss-check-varlen-h200.jsonl (2).
# Run from the repository root on the GPU machine:
#   bash bench/common-recipe.sh OUT_DIR
set -u
OUT=${1:?usage: common-recipe.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
$B recipe --mode lora --steps 30 --label recipe-lora --out "$OUT/common-recipe-same-data.jsonl"
$B recipe --mode qlora --steps 28 --label recipe-qlora-28 --out "$OUT/common-recipe-same-data.jsonl"
$B recipe --mode lora --steps 25 --warmup 3 --dropout 0 --optim adamw_torch --label check-recipe \
  --out "$OUT/loss-check-varlen.jsonl"
$B run --method lora --steps 25 --warmup 3 --out "$OUT/loss-check-varlen.jsonl" \
  --config '{"label":"check-worker-varlen","varlen":true,"micro_batch":4,"group_by_tokens":false,"row_tokens":2048}'
