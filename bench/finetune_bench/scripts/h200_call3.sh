#!/usr/bin/env bash
# Device call 3 (one H200): the benchmark at the four memory budgets (30 optimizer steps each,
# 5 warm-up + 25 timed), an A/B of cuDNN attention on length-grouped batches, and the common
# recipe on the same data.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
B="python3 -m finetune_bench.cli"
G='"length_grouped":true,"packing":false'
timeout 230 $B run --method lora --steps 30 --warmup 5 --out $OUT/bench.jsonl \
  --config '{"label":"AB-grouped-6k-cudnn","steps":9,"warmup_excluded":3,'"$G"',"tokens_per_micro_batch":6144,"cudnn_sdpa":true}' \
  --config '{"label":"AB-grouped-6k-flash","steps":9,"warmup_excluded":3,'"$G"',"tokens_per_micro_batch":6144}' \
  --config '{"label":"budget-80GiB",'"$G"',"tokens_per_micro_batch":13312}' \
  --config '{"label":"budget-48GiB",'"$G"',"tokens_per_micro_batch":6656}' \
  --config '{"label":"budget-24GiB",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0}'
timeout 100 $B run --method qlora --steps 30 --warmup 5 --out $OUT/bench.jsonl \
  --config '{"label":"budget-12GiB",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}'
timeout 110 $B recipe --mode lora --steps 30 --label recipe-lora --out $OUT/recipe.jsonl 2>&1 | grep -v "^{'loss'"
timeout 115 $B recipe --mode qlora --steps 20 --label recipe-qlora --out $OUT/recipe.jsonl 2>&1 | grep -v "^{'loss'"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv
echo CALL3-DONE
