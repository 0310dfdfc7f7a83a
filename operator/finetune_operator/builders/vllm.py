"""What goes into a vLLM server: the `vllm serve` command line for a set of adapters, where
the pod finds each adapter, and the facts of vLLM the adapter checks rely on.

vLLM facts used here are from its v0.11 CLI and LoRA code (the default serving image):
`vllm/config/lora.py` (MaxLoRARanks), `vllm/entrypoints/openai/cli_args.py`
(`--lora-modules name=path ...` in one flag: the parser action replaces the list on every
occurrence), `vllm/lora/peft_helper.py` (DoRA and modules_to_save are refused at load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune_api.common import uri_scheme

from .server_group import ServingDefaults, served_base_name
from .storage import locate

PORT = 8000
HEALTH_PATH = "/health"
ADAPTERS_DIR = "/adapters"
"""Where s3:// adapters are copied to in the pod."""
MODELS_DIR = "/models"
"""Where an s3:// base model and tokenizer are copied to in the pod."""

# vllm/config/lora.py, `MaxLoRARanks` (v0.11): --max-lora-rank accepts only these.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Leaf module names vLLM applies LoRA to in the decoder families it serves (its models'
# `packed_modules_mapping` and linear layer names): Llama/Mistral/Qwen/Gemma, Phi-3,
# GPT-2/StarCoder, Falcon/GPT-NeoX/Bloom, Mixtral experts, InternLM2, Baichuan, OPT/Phi.
# An allow-list rather than a deny-list on purpose: one adapter vLLM cannot load crashes
# the shared server for every adapter on it, so an unknown name is refused up front.
SERVABLE_TARGET_MODULES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "c_attn",
        "c_proj",
        "c_fc",
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "w1",
        "w2",
        "w3",
        "wqkv",
        "wo",
        "W_pack",
        "fc1",
        "fc2",
        "out_proj",
        "embed_tokens",
        "lm_head",
        "all-linear",  # PEFT's shorthand: every linear layer except the output head
    }
)


def server_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that covers every adapter (`--max-lora-rank`)."""
    need = max(ranks, default=VLLM_LORA_RANKS[0])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ValueError(f"LoRA rank {need} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def server_check_inputs(config: dict, max_rank: int) -> dict:
    """The `server` argument of `adapter_checks.adapter_problems`: what this operator knows
    of vLLM, which the checks (also run in the pod, without this package) are given."""
    return {
        "baseModel": config["baseModel"],
        "maxRank": max_rank,
        "vllmMaxRank": VLLM_LORA_RANKS[-1],
        "servableModules": sorted(SERVABLE_TARGET_MODULES),
    }


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter that passed the checks the operator can run."""

    name: str
    """The `model` name clients send."""
    uri: str
    deployment: str
    """The AdapterDeployment that asked for it."""
    max_rank: int
    """The rank the server must accept for it: its own, or its deployment's limit."""
    sha256: str | None = None
    fine_tune_job: str | None = None


def adapter_path(adapter: ServedAdapter) -> str:
    """Where vLLM finds the adapter inside the pod (or the Hub id it downloads)."""
    scheme = uri_scheme(adapter.uri)
    if scheme == "pvc":
        return locate(adapter.uri).local_path
    if scheme == "s3":
        return f"{ADAPTERS_DIR}/{adapter.name}"
    return adapter.uri[len("hf://") :]  # vLLM resolves Hub ids with huggingface_hub


def lora_module_arg(adapter: ServedAdapter, base_name: str) -> str:
    path = adapter_path(adapter)
    # vLLM splits `name=path` on "=" and treats anything with "," as JSON.
    if "=" in path or "," in path:
        return json.dumps(
            {"name": adapter.name, "path": path, "base_model_name": base_name},
            separators=(",", ":"),
        )
    return f"{adapter.name}={path}"


def _model_location(config: dict) -> str:
    base = config["baseModel"]
    if base.get("name"):
        return base["name"]
    uri = base["uri"]
    scheme = uri_scheme(uri)
    if scheme == "hf":
        return uri[len("hf://") :]
    if scheme == "pvc":
        return locate(uri).local_path
    return f"{MODELS_DIR}/base"


def _tokenizer_location(tokenizer: str) -> str:
    if "://" not in tokenizer:
        return tokenizer
    scheme = uri_scheme(tokenizer)
    if scheme == "hf":
        return tokenizer[len("hf://") :]
    if scheme == "pvc":
        return locate(tokenizer).local_path
    return f"{MODELS_DIR}/tokenizer"


def vllm_args(config: dict, adapters: list[ServedAdapter], defaults: ServingDefaults) -> list[str]:
    """`vllm serve` arguments: the base model with every adapter registered by name."""
    base = config["baseModel"]
    base_name = served_base_name(config)
    max_loras = max(1, min(len(adapters), defaults.max_loras_per_batch))
    args = [
        _model_location(config),
        "--served-model-name",
        base_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--enable-lora",
        "--max-lora-rank",
        str(server_rank([a.max_rank for a in adapters])),
        "--max-loras",
        str(max_loras),
        # Every adapter stays in host memory, so a request for any of them never reloads it.
        "--max-cpu-loras",
        str(max(max_loras, len(adapters))),
        "--lora-modules",
        *[lora_module_arg(a, base_name) for a in adapters],
    ]
    if base.get("revision"):
        args += ["--revision", base["revision"]]
    if base.get("tokenizer"):
        args += ["--tokenizer", _tokenizer_location(base["tokenizer"])]
    if config["gpu"]["count"] > 1:
        args += ["--tensor-parallel-size", str(config["gpu"]["count"])]
    return args + list(defaults.extra_args)
