#!/usr/bin/env bash
# A tuned plain transformers + peft + liger setup, the third baseline beside the common recipe
# as written (bench/common-recipe.sh) and the product path (bench/trainer-budgets.sh): the
# recipe's trl SFTTrainer and hyperparameters (LoRA r 16 on every projection, dropout 0.1,
# seq 512) with what a careful user would change without our worker: micro-batches of 16
# examples padded to their longest, 6 accumulated (96 examples per step, the benchmark's
# effective batch), liger's kernels and fused AdamW. 6 optimizer steps, the first 2 not timed.
# Run from the repository root on the GPU machine:  bash bench/baselines.sh OUT_DIR
set -u
OUT=${1:?usage: baselines.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
timeout 240 $B recipe --mode lora --steps 6 --warmup 2 --mb 16 --ga 6 --liger \
  --optim adamw_torch_fused --label tuned-plain-lora --out "$OUT/baselines.jsonl" 2>&1 \
  | grep -E "^RESULT|Error|error|tokens" | cut -c1-200
