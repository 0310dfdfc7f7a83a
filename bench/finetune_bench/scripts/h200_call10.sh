#!/usr/bin/env bash
# Device call 10 (third session, the last ~5 minutes of device time): the 80 GiB plan again,
# the budget with the thinnest margin over its target (15,538 vs 15,000 tokens/s in call 5),
# to see whether that result repeats on a fresh machine. Nothing else fits the time left.
set -u
source bench/finetune_bench/scripts/h200_common.sh
timeout 200 $B trainer --memory 80Gi --out $OUT/trainer.jsonl 2>&1 | grep -E "^trainer|Error|error" | head -20
echo CALL10-DONE
