"""Model shapes the benchmark and calibration build with random weights (no downloads)."""

from __future__ import annotations

SHAPES: dict[str, dict] = {
    # Meta-Llama-3-8B's config.json, minus the weights.
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # Llama-3.2-1B's shape: the smaller point of the calibration (tied embeddings).
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    # Mistral-7B-v0.3's shape (examples/finetunejob-qlora.yaml).
    "mistral-7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32768,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # For CPU tests of the harness itself.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
}


def llama_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; expected one of {sorted(SHAPES)}")
    return LlamaConfig(use_cache=False, **SHAPES[shape])


def describe(shape: str) -> dict:
    s = SHAPES[shape]
    return {
        "shape": shape,
        "hidden": s["hidden_size"],
        "intermediate": s["intermediate_size"],
        "layers": s["num_hidden_layers"],
        "heads": s["num_attention_heads"],
        "kv_heads": s["num_key_value_heads"],
        "vocab": s["vocab_size"],
        "tied": bool(s.get("tie_word_embeddings", False)),
    }


def matmul_params(shape: str) -> int:
    """Parameters that take part in a matmul per token (all but the input embedding)."""
    s = SHAPES[shape]
    h, i, L, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return L * per_layer + v * h
