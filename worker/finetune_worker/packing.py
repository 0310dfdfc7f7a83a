"""Turning tokenised examples into training batches, with or without padding.

Instruction data is short and uneven (most examples a few hundred tokens, a long tail to the
length limit). Right-padding a batch to its longest member spends GPU time on pad tokens;
padding-free packing concatenates the batch into one row instead and tells the model where each
sequence starts through `position_ids` that restart at 0. With no `attention_mask`, transformers
turns those restarts into a block-diagonal causal mask (masking_utils.find_packed_sequence_indices),
so a token never attends to, or is trained to predict, a token of another sequence: the loss is
the same as for the sequences run one by one (tests/test_perf_packing.py checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

IGNORE_INDEX = -100  # the label value transformers' causal-LM loss skips


def _truncate(example: dict[str, Sequence[int]], seq_len: int) -> tuple[list[int], list[int]]:
    ids = list(example["input_ids"])[:seq_len]
    labels = list(example.get("labels", ids))[:seq_len]
    if len(labels) != len(ids):
        raise ValueError(
            f"an example has {len(example['input_ids'])} input_ids but {len(example['labels'])} "
            "labels; they must be the same length (use -100 for tokens not to train on)."
        )
    return ids, labels


def make_collator(tokenizer: Any, seq_len: int, packing: bool) -> Callable[[list[dict]], dict]:
    """Build the collate function for a list of {"input_ids", "labels"} examples.

    packing=True: one row holding every example back to back (padding-free), `position_ids`
    restarting per example and the label of each example's first token set to -100, so the last
    token of one example is never trained to predict the first token of the next. The number of
    tokens in a step is the sum of the examples' lengths, not micro-batch x longest.
    packing=False: right-padded to the longest example in the batch (not to seq_len), with an
    attention_mask and -100 labels on padding.
    Each example is truncated to seq_len tokens first.
    """
    import torch

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0

    def collate_packed(examples: list[dict]) -> dict:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for example in examples:
            ids, labs = _truncate(example, seq_len)
            if not ids:
                continue
            input_ids += ids
            labels += [IGNORE_INDEX] + labs[1:]
            position_ids += range(len(ids))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }

    def collate_padded(examples: list[dict]) -> dict:
        rows = [_truncate(e, seq_len) for e in examples]
        width = max((len(ids) for ids, _ in rows), default=0)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    return collate_packed if packing else collate_padded


def token_budget_batches(
    lengths: Sequence[int], max_tokens: int, *, seq_len: int | None = None
) -> Iterator[list[int]]:
    """Group example indices, in order, into micro-batches of at most `max_tokens` real tokens.

    With packing the cost of a micro-batch is its token count, not its example count, so the
    planner sizes micro-batches in tokens (micro_batch_size x seq_len): each step then has about
    the same work and the same peak memory however long the examples are. Order is kept so a
    run is reproducible and comparable with an unpacked run over the same examples.
    """
    batch: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        n = min(n, seq_len) if seq_len else n
        if batch and used + n > max_tokens:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch


def real_tokens(batch: dict) -> int:
    """Tokens of actual data in a collated batch (padding excluded): what tokens/s counts."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def trained_tokens(batch: dict) -> int:
    """Label positions that contribute to the loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf
