#!/usr/bin/env bash
# The product path at four GPU memory budgets: for each, the FineTuneJob spec a user would
# write (Llama-3-8B shape, LoRA r=16, dropout 0, packing, seqLength 512, batchSize 96) goes
# through the operator's planner, and its plan is trained by the worker's own trainer
# (`finetune-bench trainer`; 23 optimizer steps of which 20 timed). At 48 GiB also with trl's
# fused-head loss instead of the model's. Committed (one H200):
# bench/data/trainer-budgets-h200.jsonl; the 80 GiB run again on another machine
# (`finetune-bench trainer --memory 80Gi`): bench/data/trainer-80GiB-repeat-h200.jsonl.
# Results in docs/benchmarks.md.
# Run from the repository root on the GPU machine:
#   bash bench/trainer-budgets.sh OUT_DIR
set -u
OUT=${1:?usage: trainer-budgets.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
$B trainer --memory 80Gi,48Gi --trl-loss 48Gi --out "$OUT/trainer-budgets.jsonl"
$B trainer --memory 24Gi,12Gi --out "$OUT/trainer-budgets.jsonl"
