#!/usr/bin/env bash
# Device call 6 (one H200): the product path at 24 GiB (LoRA with checkpointing) and 12 GiB
# (QLoRA), then the common recipe (LoRA) on the same data.
set -u
source bench/finetune_bench/scripts/h200_common.sh
timeout 330 $B trainer --memory 24Gi,12Gi --out $OUT/trainer.jsonl 2>&1 | grep -E "^trainer|Error|error" | head -20
timeout 130 $B recipe --mode lora --steps 30 --label recipe-lora --out $OUT/recipe.jsonl 2>&1 | grep -v "^{'loss'" | tail -3
echo CALL6-DONE
