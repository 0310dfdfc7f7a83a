#!/usr/bin/env bash
# Device call 5 (one H200): varlen packed rows. The GPU tests of the varlen kernel, then the
# product path (planner's choice -> worker's trainer) at 80 and 48 GiB, the 48 GiB run again
# with trl's fused-head loss, and the lean loop at the same micro-batches (trainer overhead).
set -u
source bench/finetune_bench/scripts/h200_common.sh
python3 -c "import inspect, torch; from torch.nn.attention.varlen import varlen_attn; print(torch.__version__, inspect.signature(varlen_attn))"
python3 -m pytest --noconftest -p no:cacheprovider -q tests/test_perf_gpu.py 2>&1 | tail -4
timeout 30 $B env --out $OUT/env.jsonl | cut -c1-400
timeout 330 $B trainer --memory 80Gi,48Gi --trl-loss 48Gi --out $OUT/trainer.jsonl 2>&1 | grep -E "^trainer|Error|error" | head -20
V='"varlen":true,"grad_accum":1,"steps":24,"warmup_excluded":4'
timeout 100 $B run --method lora --out $OUT/lean.jsonl \
  --config '{"label":"lean-80GiB-varlen",'"$V"',"tokens_per_micro_batch":12288}' \
  --config '{"label":"lean-48GiB-varlen",'"$V"',"tokens_per_micro_batch":6144}' 2>&1 | grep -E "^RESULT" | cut -c1-300
echo CALL5-DONE
