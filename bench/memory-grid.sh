#!/usr/bin/env bash
# Peak GPU memory of the worker's configuration over a grid, for the planner's memory model:
# LoRA and QLoRA x seq 512 and 2048 x micro-batch 1, 4, 8 x checkpointing off and on, on the
# Llama-3-8B and Llama-3.2-1B shapes (random weights, full-length samples so no attention
# mask, r=16 on all seven projections, dropout 0, liger kernels, fused AdamW), 2 optimizer
# steps per point. First the environment: versions, CUDA context, measured matmul and copy
# ceilings. Committed results (one H200): tests/data/calibration/worker-grid-h200.jsonl
# (replayed by tests/planner/test_planner_calibration.py) and bench/data/h200-env.jsonl.
# Run from the repository root on the GPU machine:
#   bash bench/memory-grid.sh OUT_DIR
set -u
OUT=${1:?usage: memory-grid.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv
$B env --out "$OUT/env.jsonl"
$B calibrate --shape llama-3-8b --method lora --steps 2 --out "$OUT/memory-grid.jsonl"
$B calibrate --shape llama-3-8b --method qlora --steps 2 --out "$OUT/memory-grid.jsonl"
$B calibrate --shape llama-3.2-1b --method lora,qlora --steps 2 --out "$OUT/memory-grid.jsonl"
