#!/usr/bin/env bash
# What the per-step GPU synchronisations cost a host-bound job: the seed's QLoRA job unpacked
# (rows filled, mostly one row per optimizer step) as the worker runs it (the loss and grad
# norm read every step, tokens counted on the GPU per batch) against the same trainer with
# logging every 10^6 steps and no token count; neither with the benchmark's own per-step
# synchronisation. 28 optimizer steps, 4 not timed, alternated twice.
# Run from the repository root on the GPU machine:  bash bench/step-syncs.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: step-syncs.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/step-syncs.jsonl"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
SEED="$SEED,\"training.packing\":false"
args=()
for round in 1 2; do
  args+=(--job "{\"label\":\"as the worker runs it-$round\",\"manifest\":\"$L\",\"set\":{$SEED},\"sync_each_step\":false}")
  args+=(--job "{\"label\":\"no per-step reads-$round\",\"manifest\":\"$L\",\"set\":{$SEED},\"sync_each_step\":false,\"trainer_args\":{\"logging_steps\":1000000,\"include_num_input_tokens_seen\":\"no\"}}")
done
timeout 420 $B job --shape llama-3-8b --steps 28 --warmup 4 --out "$OUT" "${args[@]}" \
  2>&1 | grep -E "^job |Error|error" | cut -c1-200
