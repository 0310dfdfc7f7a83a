"""The tiny Llama-architecture model and tokenizer of the CPU tests.

The same maker as the demo's (finetune_dev.tinymodel: random seeded weights from
a transformers config, a byte-level BPE trained in about a second, a role-token chat
template; nothing downloaded), trained on the committed test data and smaller still so
every worker test stays fast on two cores.
"""

from __future__ import annotations

from pathlib import Path

from finetune_dev import tinymodel as maker

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
CHAT_TEMPLATE = maker.CHAT_TEMPLATE


def datasets() -> list[Path]:
    return sorted(DATA_DIR.glob("*.jsonl"))


def make_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 512):
    return maker.make_tiny_tokenizer(directory, datasets(), vocab_size=vocab_size)


def make_tiny_model(directory: str | Path, **sizes) -> Path:
    """hidden 64, 2 layers, intermediate 128 by default: multiples of 64, so bitsandbytes
    can NF4-quantise every projection (its block size is 64)."""
    sizes = {"hidden": 64, "layers": 2, "intermediate": 128, "max_positions": 256, **sizes}
    return maker.make_tiny_model(directory, datasets(), **sizes)


def tiny_llama(*, dtype=None, layers: int = 2, attn: str = "sdpa", seed: int = 0):
    """An untrained tiny Llama in memory (hidden 64, 4 heads over 2 K/V heads, vocabulary
    256), for tests of layers and batches that need no tokenizer or files."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        use_cache=False,
    )
    config._attn_implementation = attn
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
