#!/usr/bin/env bash
# Device call 4 (one H200): per-step times of the budget runs, with and without widths padded
# to a multiple of 64 (fewer distinct batch shapes).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
B="python3 -m finetune_bench.cli"
G='"length_grouped":true,"packing":false'
timeout 200 $B run --method lora --steps 30 --warmup 5 --out $OUT/bench4.jsonl \
  --config '{"label":"budget-48GiB-b64",'"$G"',"tokens_per_micro_batch":6656,"pad_multiple":64}' \
  --config '{"label":"budget-48GiB-again",'"$G"',"tokens_per_micro_batch":6656}' \
  --config '{"label":"budget-80GiB-b64",'"$G"',"tokens_per_micro_batch":13312,"pad_multiple":64}' \
  --config '{"label":"budget-24GiB-b64",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0,"pad_multiple":64}'
echo CALL4-DONE
