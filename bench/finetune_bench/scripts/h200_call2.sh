#!/usr/bin/env bash
# Device call 2 (one H200): second round of levers, profile, QLoRA levers, the common recipe on
# the same data, and the loss-curve check (recipe vs worker loop, same data/seed/hyperparameters).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
B="python3 -m finetune_bench.cli"
G='"length_grouped":true,"packing":false'
timeout 175 $B run --method lora --steps 9 --warmup 3 --examples 3000 --out $OUT/levers2.jsonl \
  --profile N2-grouped-8k --profile-table $OUT/profile-N2.txt \
  --config '{"label":"N1-packed-8k-lean","tokens_per_micro_batch":8192}' \
  --config '{"label":"N2-grouped-8k",'"$G"',"tokens_per_micro_batch":8192}' \
  --config '{"label":"N0-grouped-8k-notlean",'"$G"',"tokens_per_micro_batch":8192,"lean_lora":false}' \
  --config '{"label":"N3-grouped-12k",'"$G"',"tokens_per_micro_batch":12288}' \
  --config '{"label":"N5-grouped-4k",'"$G"',"tokens_per_micro_batch":4096}' \
  --config '{"label":"N6-grouped-6k",'"$G"',"tokens_per_micro_batch":6144}' \
  --config '{"label":"N8-grouped-12k-ckpt1",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0}' \
  --config '{"label":"N9-grouped-8k-ckpt1",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}' \
  --config '{"label":"N10-grouped-16k-ckpt0.5",'"$G"',"tokens_per_micro_batch":16384,"grad_ckpt":0.5}' \
  --config '{"label":"N4-grouped-16k",'"$G"',"tokens_per_micro_batch":16384}'
timeout 120 $B run --method qlora --steps 9 --warmup 3 --examples 3000 --out $OUT/levers2.jsonl \
  --config '{"label":"Q1-grouped-8k-ckpt1",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}' \
  --config '{"label":"Q2-grouped-12k-ckpt1",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0}' \
  --config '{"label":"Q4-fp32upcast-8k-ckpt1",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0,"kbit_fp32_upcast":true,"lean_lora":false}'
timeout 60 $B recipe --mode lora --steps 30 --label recipe-lora --out $OUT/recipe.jsonl
timeout 85 $B recipe --mode qlora --steps 25 --label recipe-qlora --out $OUT/recipe.jsonl
timeout 50 $B recipe --mode lora --steps 25 --warmup 3 --dropout 0 --optim adamw_torch --label check-recipe --out $OUT/recipe.jsonl
timeout 50 $B run --method lora --steps 25 --warmup 3 --out $OUT/recipe.jsonl \
  --config '{"label":"check-worker","micro_batch":4,"group_by_tokens":false,"row_tokens":4096}'
echo CALL2-DONE
