#!/usr/bin/env bash
# Device call 9 (one H200): tokens/s against micro-batch size for varlen rows (lean loop, LoRA),
# to calibrate the planner's speed model (decide.SATURATION_TOKENS, SPEED_RATES).
set -u
source bench/finetune_bench/scripts/h200_common.sh
V='"varlen":true,"grad_accum":1,"steps":24,"warmup_excluded":4'
timeout 200 $B run --method lora --out $OUT/speed.jsonl \
  --config '{"label":"speed-1k",'"$V"',"tokens_per_micro_batch":1024}' \
  --config '{"label":"speed-2k",'"$V"',"tokens_per_micro_batch":2048}' \
  --config '{"label":"speed-4k",'"$V"',"tokens_per_micro_batch":4096}' \
  --config '{"label":"speed-2k-ckpt",'"$V"',"tokens_per_micro_batch":2048,"grad_ckpt":1.0}' \
  --config '{"label":"speed-8k-ckpt",'"$V"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}' \
  2>&1 | grep -E "^RESULT" | cut -c1-120
python3 -c "
import json
for l in open('$OUT/speed.jsonl'):
    r = json.loads(l); print(r['label'], round(r['tokens_per_s']), r['peak_total_GiB'], r['step_s_median'])"
echo CALL9-DONE
