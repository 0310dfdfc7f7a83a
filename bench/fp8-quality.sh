#!/usr/bin/env bash
# The quality an FP8 frozen base costs (bench/finetune_bench/fp8_quality.py): the same LoRA job
# (Llama-3-8B shape, r 16 on every projection, dropout 0, packed varlen rows of 8,192 tokens per
# optimizer step, lr 2e-4, 200 steps) on the bf16 base and on its FP8 copy; then the held-out
# loss (256 examples never trained on) of each adapter, and of the FP8-trained adapter merged
# into the bf16 base as AdapterMerge does.
# Run from the repository root on the GPU machine:  bash bench/fp8-quality.sh OUT_DIR
set -u
OUT_DIR=${1:?usage: fp8-quality.sh OUT_DIR}
# shellcheck source=bench/gpu-env.sh
source bench/gpu-env.sh || exit 1
timeout 330 $B fp8-quality --shape llama-3-8b --steps 200 --examples 6000 \
  --config '{"varlen":true,"dropout":0.0,"grad_ckpt":0,"tokens_per_micro_batch":8192}' \
  --out "$OUT_DIR/fp8-quality.jsonl" 2>&1 | grep -vE "^RESULT" | grep -E "tok/s|Error|error" | cut -c1-200
python3 - "$OUT_DIR/fp8-quality.jsonl" <<'PY'
import json, sys
r = [json.loads(line) for line in open(sys.argv[1])][-1]
for m in ("lora", "fp8"):
    print(m, r[m]["tokens_per_s"], "tok/s", r[m]["peak_total_GiB"], "GiB eval", round(r[m]["eval_loss"], 5),
          "losses", [round(x, 4) for x in r[m]["losses"][::25]])
print("checksums", r["base_checksum"])
print("loss relative difference", r["loss_relative_difference"])
print("eval: fp8 adapter on bf16", round(r["fp8_adapter_on_bf16_eval_loss"], 5),
      "merged", round(r["fp8_adapter_merged_bf16_eval_loss"], 5),
      "merged vs adapter", round(r["merged_vs_adapter_eval_relative"], 5),
      "fp8 vs bf16", round(r["fp8_vs_bf16_eval_relative"], 5))
PY
