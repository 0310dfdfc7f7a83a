#!/usr/bin/env bash
# Device call 7 (one H200): the common recipe (QLoRA) on the same data, complete this time.
set -u
source worker/finetune_worker/bench/scripts/h200_common.sh
timeout 200 $B recipe --mode qlora --steps 25 --label recipe-qlora --out $OUT/recipe.jsonl 2>&1 | grep -v "^{'loss'" | tail -3
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv
echo CALL7-DONE
