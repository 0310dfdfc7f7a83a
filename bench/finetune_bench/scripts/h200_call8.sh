#!/usr/bin/env bash
# Device call 8 (one H200): the loss-curve check with the new attention path (the common recipe
# with dropout 0 and torch AdamW vs the worker's loop on the same 4 examples per step, now as
# one varlen row), and the QLoRA common recipe again with more steps (call 7 timed 19).
set -u
source bench/finetune_bench/scripts/h200_common.sh
timeout 100 $B recipe --mode lora --steps 25 --warmup 3 --dropout 0 --optim adamw_torch --label check-recipe \
  --out $OUT/check.jsonl 2>&1 | grep -E "^RESULT" | cut -c1-300
timeout 80 $B run --method lora --steps 25 --warmup 3 --out $OUT/check.jsonl \
  --config '{"label":"check-worker-varlen","varlen":true,"micro_batch":4,"group_by_tokens":false,"row_tokens":2048}' \
  2>&1 | grep -E "^RESULT" | cut -c1-200
timeout 220 $B recipe --mode qlora --steps 28 --label recipe-qlora-28 --out $OUT/recipe.jsonl 2>&1 | grep -E "^RESULT" | cut -c1-300
echo CALL8-DONE
