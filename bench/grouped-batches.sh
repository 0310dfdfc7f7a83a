#!/usr/bin/env bash
# Length-grouped batches without an attention mask (flash attention, little padding) on the
# worker's training loop, LoRA r=16 on the Llama-3-8B shape (QLoRA at 12 GiB), realistic
# lengths truncated at 512 (docs/perf-notes.md):
#   1. cuDNN attention on against off at 6k tokens per micro-batch (9 steps, 6 timed);
#   2. the micro-batch sized for each memory budget (80 / 48 / 24 GiB LoRA, 12 GiB QLoRA),
#      30 optimizer steps of which 25 timed;
#   3. the same with widths padded to a multiple of 64 (fewer distinct batch shapes), and the
#      48 GiB run unpadded again for the run-to-run spread.
# Committed (one H200): bench/data/grouped-batches-budgets-h200.jsonl (1 and 2),
# bench/data/grouped-batches-pad64-h200.jsonl (3).
# Run from the repository root on the GPU machine:
#   bash bench/grouped-batches.sh OUT_DIR
set -u
OUT=${1:?usage: grouped-batches.sh OUT_DIR}
mkdir -p "$OUT"
# shellcheck source=bench/gpu-env.sh
source "$(dirname "$0")/gpu-env.sh"
G='"length_grouped":true,"packing":false'
$B run --method lora --steps 30 --warmup 5 --out "$OUT/grouped-batches-budgets.jsonl" \
  --config '{"label":"AB-grouped-6k-cudnn","steps":9,"warmup_excluded":3,'"$G"',"tokens_per_micro_batch":6144,"cudnn_sdpa":true}' \
  --config '{"label":"AB-grouped-6k-flash","steps":9,"warmup_excluded":3,'"$G"',"tokens_per_micro_batch":6144}' \
  --config '{"label":"budget-80GiB",'"$G"',"tokens_per_micro_batch":13312}' \
  --config '{"label":"budget-48GiB",'"$G"',"tokens_per_micro_batch":6656}' \
  --config '{"label":"budget-24GiB",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0}'
$B run --method qlora --steps 30 --warmup 5 --out "$OUT/grouped-batches-budgets.jsonl" \
  --config '{"label":"budget-12GiB",'"$G"',"tokens_per_micro_batch":8192,"grad_ckpt":1.0}'
$B run --method lora --steps 30 --warmup 5 --out "$OUT/grouped-batches-pad64.jsonl" \
  --config '{"label":"budget-48GiB-b64",'"$G"',"tokens_per_micro_batch":6656,"pad_multiple":64}' \
  --config '{"label":"budget-48GiB-again",'"$G"',"tokens_per_micro_batch":6656}' \
  --config '{"label":"budget-80GiB-b64",'"$G"',"tokens_per_micro_batch":13312,"pad_multiple":64}' \
  --config '{"label":"budget-24GiB-b64",'"$G"',"tokens_per_micro_batch":12288,"grad_ckpt":1.0,"pad_multiple":64}'
