# shellcheck shell=bash
# Sourced by the bench/*.sh scripts that train the common recipe's QLoRA job (bench/reference/)
# through the product path: $L, the manifest whose spec it starts from, and $SEED, the
# `finetune-bench job` overrides (JSON members, without braces) that make it the recipe's job:
# 8B, 12Gi, r 64, alpha 16, dropout 0.1, seq 512, 16 examples per step. Scripts add packing.
# shellcheck disable=SC2034  # used by the scripts that source this file
L=examples/finetunejob-llama3-8b.yaml
# shellcheck disable=SC2034
SEED='"method":"qlora","lora.r":64,"lora.alpha":16,"lora.dropout":0.1,"training.seqLength":512,"training.batchSize":16,"resources.gpu.memory":"12Gi"'
