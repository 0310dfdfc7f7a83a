#!/usr/bin/env bash
# One lever at a time on the worker's training loop (finetune_bench.harness), LoRA r=16 on the
# Llama-3-8B shape, realistic-length data truncated at 512, 9 optimizer steps of which the
# last 6 are timed (docs/perf-notes.md):
#   L runs: packed rows of 512 (position-id resets, block-diagonal mask), one lever each
#     against L1: liger kernels off, lora_dropout 0.1, no packing (16 examples padded), one
#     padding-free row per micro-batch, 4k/16k/24k tokens per micro-batch, full and half
#     checkpointing. Committed: bench/data/levers-packed-rows-h200.jsonl.
#   N and Q runs: lean LoRA layers, length-grouped batches without a mask, tokens per
#     micro-batch, checkpointing; QLoRA with bf16 or peft's fp32 embeddings. N2 is profiled
#     (kernel table in profile-grouped-batches-8k.txt; its tokens/s is not valid, the profiler
#     runs inside the timed steps). Committed: bench/data/levers-grouped-batches-h200.jsonl,
#     bench/data/profile-grouped-batches-8k-h200.txt.
# The committed runs predate two defaults, so the configs pin the settings they had: peft's
# own LoRA layers for the L runs ("lean_lora":false), SDPA free to pick cuDNN attention for
# the N and Q runs ("cudnn_sdpa":true).
# Run from the repository root on the GPU machine:
#   bash bench/levers.sh OUT_DIR
set -u
OUT=${1:?usage: levers.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
P='"lean_lora":false'
$B run --method lora --steps 9 --warmup 3 --examples 3000 --out "$OUT/levers-packed-rows.jsonl" \
  --config '{"label":"L0-noliger-8k",'"$P"',"fused_kernels":false,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L1-base-8k",'"$P"',"tokens_per_micro_batch":8192}' \
  --config '{"label":"L2-dropout0.1-8k",'"$P"',"dropout":0.1,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L3-nopack-mb16",'"$P"',"packing":false,"micro_batch":16}' \
  --config '{"label":"L5-onerow-8k",'"$P"',"row_tokens":8192,"tokens_per_micro_batch":8192}' \
  --config '{"label":"L6-16k",'"$P"',"tokens_per_micro_batch":16384}' \
  --config '{"label":"L9-ckpt1-16k",'"$P"',"grad_ckpt":1.0,"tokens_per_micro_batch":16384}' \
  --config '{"label":"L10-ckpt0.5-16k",'"$P"',"grad_ckpt":0.5,"tokens_per_micro_batch":16384}' \
  --config '{"label":"L7-24k",'"$P"',"tokens_per_micro_batch":24576}' \
  --config '{"label":"L12-4k",'"$P"',"tokens_per_micro_batch":4096}'
G='"length_grouped":true,"packing":false,"cudnn_sdpa":true'
$B run --method lora --steps 9 --warmup 3 --examples 3000 --out "$OUT/levers-grouped-batches.jsonl" \
  --profile N2-grouped-8k --profile-table "$OUT/profile-grouped-batches-8k.txt" \
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
$B run --method qlora --steps 9 --warmup 3 --examples 3000 --out "$OUT/levers-grouped-batches.jsonl" \
  --config '{"label":"Q1-grouped-8k-ckpt1",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}' \
  --config '{"label":"Q2-grouped-12k-ckpt1",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0}' \
  --config '{"label":"Q4-fp32upcast-8k-ckpt1",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0,"kbit_fp32_upcast":true,"lean_lora":false}'
