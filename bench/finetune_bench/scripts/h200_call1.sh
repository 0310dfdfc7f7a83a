#!/usr/bin/env bash
# Device call 1 (one H200): environment, calibration grid, first lever measurements.
# Run from the repository root with the carried wheels in .whl/ and $OUT set by the device tool.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/worker:$PWD/operator PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=false
B="python3 -m finetune_bench.cli"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,power.limit --format=csv | tee $OUT/nvidia-smi.txt
timeout 60 $B env --out $OUT/env.jsonl
timeout 110 $B calibrate --shape llama-3-8b --method lora --steps 2 --out $OUT/calib.jsonl
timeout 140 $B calibrate --shape llama-3-8b --method qlora --steps 2 --out $OUT/calib.jsonl
timeout 80 $B calibrate --shape llama-3.2-1b --method lora,qlora --steps 2 --out $OUT/calib.jsonl
timeout 170 $B run --method lora --steps 9 --warmup 3 --examples 3000 --out $OUT/levers.jsonl \
  --config '{"label":"L0-noliger-8k","fused_kernels":false,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L1-base-8k","tokens_per_micro_batch":8192}' \
  --config '{"label":"L2-dropout0.1-8k","dropout":0.1,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L3-nopack-mb16","packing":false,"micro_batch":16}' \
  --config '{"label":"L5-onerow-8k","row_tokens":8192,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L6-16k","tokens_per_micro_batch":16384}' \
  --config '{"label":"L9-ckpt1-16k","grad_ckpt":1.0,"tokens_per_micro_batch":16384}' \
  --config '{"label":"L10-ckpt0.5-16k","grad_ckpt":0.5,"tokens_per_micro_batch":16384}' \
  --config '{"label":"L7-24k","tokens_per_micro_batch":24576}' \
  --config '{"label":"L12-4k","tokens_per_micro_batch":4096}'
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv >> $OUT/nvidia-smi.txt
echo CALL1-DONE
