"""The demo's base model: a tiny Llama-architecture model and tokenizer, made locally.

Nothing is downloaded. The weights are random (seeded) from a transformers config and the
tokenizer is a byte-level BPE trained in about a second on the demo's dataset, so the
demo runs offline and fast on two CPU cores while going through exactly the code paths a
real Llama would (the planner reads its config.json, the worker loads it with
transformers and trains a peft adapter, the merge reloads it unquantised).
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def corpus(datasets: list[Path]) -> list[str]:
    """Every string in the datasets (a line that is not JSON counts as text)."""
    lines: list[str] = []
    for path in datasets:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                lines += _strings(json.loads(line))
            except json.JSONDecodeError:
                lines.append(line)
    try:
        # The worker's prompt layouts recur in every alpaca example; merging them into
        # few tokens keeps sequences short, as a real tokenizer's vocabulary would.
        from finetune_worker.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

        lines += [ALPACA_NO_INPUT, ALPACA_WITH_INPUT] * 50
    except ImportError:
        pass
    return lines


def make_tiny_model(
    directory: str | Path,
    datasets: list[Path],
    *,
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write config.json, bf16 safetensors and the tokenizer to `directory`.

    Sizes are multiples of 64 so bitsandbytes could NF4-quantise every projection.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(directory, datasets, vocab_size=vocab_size)
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
        # Larger than the usual 0.02: with the output head frozen under LoRA, tiny random
        # rows would keep the logits near uniform and the loss would barely move.
        initializer_range=0.2,
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


def make_tiny_tokenizer(directory: str | Path, datasets: list[Path], *, vocab_size: int = 512):
    """A byte-level BPE trained on `datasets`, with role tokens and a chat template."""
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
    tok.train_from_iterator(corpus(datasets), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return tokenizer
