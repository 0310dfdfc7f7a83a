#!/usr/bin/env bash
# Device call 7 (one H200): the GPU tests again (accuracy against float32, printed), the common
# recipe (QLoRA) on the same data run to completion, and a 2-step kernel profile of the 80 GiB
# micro-batch (varlen row of 12,288 tokens) for "where the time goes".
set -u
source bench/finetune_bench/scripts/h200_common.sh
python3 -m pytest --noconftest -p no:cacheprovider -q -s tests/test_perf_gpu.py 2>&1 | grep -E "max \||passed|failed|Error" | head -12
timeout 200 $B recipe --mode qlora --steps 25 --label recipe-qlora --out $OUT/recipe.jsonl 2>&1 | grep -E "^RESULT" | cut -c1-400
timeout 120 $B run --method lora --out $OUT/profile.jsonl --profile lean-80GiB-profile --profile-steps 2 \
  --profile-table $OUT/profile-80GiB.txt \
  --config '{"label":"lean-80GiB-profile","varlen":true,"steps":8,"warmup_excluded":4,"tokens_per_micro_batch":12288}' \
  2>&1 | grep -E "^RESULT" | cut -c1-200
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv
echo CALL7-DONE
