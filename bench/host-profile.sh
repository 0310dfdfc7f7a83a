#!/usr/bin/env bash
# Where a host-bound step spends its time: the seed's QLoRA job (r 64, dropout 0.1, every layer
# checkpointed) at rows of 2,048 / 4,096 / 8,192 tokens (the per-row fixed cost against the
# per-token cost), without dropout, and FP8 against bf16 with every layer checkpointed at
# 8,192 tokens. Each run: 8 optimizer steps, 3 not timed, the last 2 profiled (GPU kernels by
# GPU time and host operators by self CPU time, appended to host-profile.txt).
# Run from the repository root on the GPU machine:  bash bench/host-profile.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: host-profile.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
OUT="$OUT_DIR/host-profile.jsonl"
P=(--steps 8 --warmup 3 --examples 3000 --profile-steps 2 --profile-table "$OUT_DIR/host-profile.txt" --out "$OUT")
run() {  # method label config-json...
  local method=$1; shift
  local args=()
  for c in "$@"; do
    args+=(--config "$c" --profile "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["label"])' "$c")")
  done
  timeout 150 $B run --shape llama-3-8b --method "$method" "${P[@]}" "${args[@]}" 2>&1 \
    | grep -E "Error|error" | cut -c1-200
}
Q='"r":64,"alpha":16,"varlen":true,"grad_ckpt":1'
run qlora "{\"label\":\"qlora-r64-d0.1-2048-ckpt\",$Q,\"dropout\":0.1,\"tokens_per_micro_batch\":2048}" \
  "{\"label\":\"qlora-r64-d0.1-4096-ckpt\",$Q,\"dropout\":0.1,\"tokens_per_micro_batch\":4096}" \
  "{\"label\":\"qlora-r64-d0.1-8192-ckpt\",$Q,\"dropout\":0.1,\"tokens_per_micro_batch\":8192}" \
  "{\"label\":\"qlora-r64-d0-4096-ckpt\",$Q,\"dropout\":0.0,\"tokens_per_micro_batch\":4096}"
C='"varlen":true,"dropout":0.0,"tokens_per_micro_batch":8192'
run fp8 "{\"label\":\"fp8-8192-ckpt\",$C,\"grad_ckpt\":1}"
run lora "{\"label\":\"lora-8192-ckpt\",$C,\"grad_ckpt\":1}"
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    prof = r.get("notes", {}).get("profile", {})
    print(f"{r['label']:28} {r['tokens_per_s']:>8.0f} tok/s {r['peak_total_GiB']:>6} GiB "
          f"median step {r['step_s_median']:.3f} s  GPU idle {prof.get('gpu_idle_share')} "
          f"{prof.get('groups_share_of_wall')} {r.get('error')}")
PY
