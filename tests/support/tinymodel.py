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
