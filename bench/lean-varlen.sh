#!/usr/bin/env bash
# One padding-free varlen row per micro-batch on the worker's training loop
# (finetune_bench.harness), LoRA r=16 on the Llama-3-8B shape, realistic lengths truncated at
# 512, one micro-batch per optimizer step (docs/perf-notes.md):
#   1. the GPU tests of the varlen kernel (accuracy against float32 per-example attention);
#   2. the micro-batches the planner picks at 80 GiB (12,288 tokens) and 48 GiB (6,144),
#      24 optimizer steps of which 20 timed;
#   3. tokens/s against micro-batch size (1k, 2k, 4k tokens; 2k and 8k with checkpointing),
#      for the planner's speed model;
#   4. a kernel profile of two 12,288-token micro-batches ("where the time goes").
# Committed (one H200): bench/data/lean-varlen-budgets-h200.jsonl (2),
# bench/data/speed-microbatch-varlen-h200.jsonl (3), bench/data/profile-varlen-80GiB-h200.*
# (4). Those runs repeated K/V to the query heads; the worker now hands grouped K/V to the
# kernel (docs/perf-notes.md, "Grouped K/V"), so a run of this script measures that.
# Run from the repository root on the GPU machine:
#   bash bench/lean-varlen.sh OUT_DIR
set -u
OUT=${1:?usage: lean-varlen.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
python3 -m pytest --noconftest -p no:cacheprovider -q -s tests/worker/test_perf_gpu.py
V='"varlen":true,"grad_accum":1,"steps":24,"warmup_excluded":4'
$B run --method lora --out "$OUT/lean-varlen-budgets.jsonl" \
  --config '{"label":"lean-80GiB-varlen",'"$V"',"tokens_per_micro_batch":12288}' \
  --config '{"label":"lean-48GiB-varlen",'"$V"',"tokens_per_micro_batch":6144}'
$B run --method lora --out "$OUT/speed-microbatch-varlen.jsonl" \
  --config '{"label":"speed-1k",'"$V"',"tokens_per_micro_batch":1024}' \
  --config '{"label":"speed-2k",'"$V"',"tokens_per_micro_batch":2048}' \
  --config '{"label":"speed-4k",'"$V"',"tokens_per_micro_batch":4096}' \
  --config '{"label":"speed-2k-ckpt",'"$V"',"tokens_per_micro_batch":2048,"grad_ckpt":1.0}' \
  --config '{"label":"speed-8k-ckpt",'"$V"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}'
$B run --method lora --out "$OUT/profile-varlen-80GiB.jsonl" --profile lean-80GiB-profile \
  --profile-steps 2 --profile-table "$OUT/profile-varlen-80GiB.txt" \
  --config '{"label":"lean-80GiB-profile","varlen":true,"steps":8,"warmup_excluded":4,"tokens_per_micro_batch":12288}'
