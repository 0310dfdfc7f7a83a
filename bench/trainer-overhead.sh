#!/usr/bin/env bash
# The worker's trainer against the bench's bare loop on host-bound steps, in one run on one
# machine (host speed differs between machines of the same kind): the seed's QLoRA job
# (r 64, dropout 0.1, every layer checkpointed) packed, so both run exactly two rows of 4,096
# tokens per optimizer step; 20 optimizer steps of which the first 4 are not timed,
# alternated twice.  Run from the repository root on the GPU machine:
#   bash bench/trainer-overhead.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: trainer-overhead.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/trainer-overhead.jsonl"
# shellcheck source=bench/seed-job.sh
source bench/seed-job.sh
SEED="$SEED,\"training.packing\":true,\"training.microBatchSize\":8,\"training.gradientCheckpointing\":\"on\""
Q='"r":64,"alpha":16,"dropout":0.1,"varlen":true,"grad_ckpt":1,"tokens_per_micro_batch":4096,"grad_accum":2,"fused_adamw":false'
for round in 1 2; do
  timeout 200 $B job --shape llama-3-8b --steps 20 --warmup 4 --out "$OUT" \
    --job "{\"label\":\"worker trainer-$round\",\"manifest\":\"$L\",\"set\":{$SEED}}" \
    2>&1 | grep -E "^job |Error|error" | cut -c1-200
  timeout 200 $B run --shape llama-3-8b --method qlora --steps 20 --warmup 4 --examples 3000 \
    --out "$OUT" --config "{\"label\":\"bare loop-$round\",$Q}" 2>&1 | grep -E "Error|error" | cut -c1-200
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    steps = r.get("step_seconds") or r.get("step_times_s") or []
    med = r.get("step_s_median") or (statistics.median(steps) if steps else float("nan"))
    print(f"{r['label']:20} {r['tokens_per_s']:>8.0f} tok/s median step {med:.3f} s "
          f"peak {r['peak_total_GiB']} GiB")
PY
