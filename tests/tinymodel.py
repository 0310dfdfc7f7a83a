"""A tiny Llama-architecture model and tokenizer, built on the fly for CPU tests.

Nothing is downloaded: the weights are random (seeded) from a transformers config, and
the tokenizer is a byte-level BPE trained in about a second on the committed test data,
so every format under tests/data tokenizes without unknown tokens. The chat template
uses role tokens, which lets the chat format and merge/generation tests run unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

# Role and control tokens. They are special tokens, so BPE never splits them.
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Roles map to their token; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus() -> list[str]:
    """Every string in the committed datasets, so the BPE merges cover them."""
    lines: list[str] = []

    def walk(value):
        if isinstance(value, str):
            lines.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for path in sorted(DATA_DIR.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                walk(json.loads(line))
            except json.JSONDecodeError:
                lines.append(line)
    # The worker's fixed prompt layouts recur in every alpaca example; repeating them
    # lets BPE merge them into few tokens, as a real tokenizer's large vocabulary would.
    from finetune_worker.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    lines += [ALPACA_NO_INPUT, ALPACA_WITH_INPUT] * 50
    return lines


def make_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it (with chat template) to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def make_tiny_model(
    directory: str | Path,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 256,
    seed: int = 0,
    initializer_range: float = 0.2,
) -> Path:
    """Write config, bf16 safetensors, tokenizer and chat template to `directory`.

    Hidden and intermediate sizes stay multiples of 64 so bitsandbytes can NF4-quantise
    every projection (its block size is 64). The initialiser range is ten times the usual
    0.02: the output head is frozen under LoRA, and with tiny random rows its logits could
    not move far enough from uniform for a test to see the model memorise its data.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(directory, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


if __name__ == "__main__":  # pragma: no cover - a convenience for poking at it by hand
    import sys

    print(make_tiny_model(sys.argv[1]))
