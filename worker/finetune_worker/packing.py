"""Turning tokenised examples into training batches, with or without padding.

Instruction data is short and uneven (most examples a few hundred tokens, a long tail to the
length limit). Right-padding a batch to its longest member spends GPU time on pad tokens;
padding-free packing concatenates the batch into one row instead and tells the model where each
sequence starts through `position_ids` that restart at 0, so a token never attends to, or is
trained to predict, a token of another sequence: the loss is the same as for the sequences run
one by one (tests/worker/test_perf_packing.py checks this).

The trainer's packed path is make_varlen_collator + PackedBatchSampler: one row of exactly the
micro-batch's token budget, with the boundaries for varlen attention (attention.py). Its unpacked
path is make_step_collator: each optimizer step's whole examples in as few varlen rows of at most
that budget as they fit, run one after another. The other
collators (rows of seq_len with transformers' block-diagonal masks from the position ids;
length-grouped padded batches without a mask) are the fallback where PyTorch has no varlen
kernel, and the benchmark's points of comparison (docs/perf-notes.md).
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


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of example indices into rows of at most row_tokens.

    Rows of bounded length keep attention cheap: SDPA has no variable-length kernel for packed
    sequences, so a row costs row_length^2 in attention however its sequences are split; rows of
    seq_len tokens cost no more than unpacked examples would. Within a row the original order
    is kept, so the same examples give the same row contents on every run.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(row_tokens - n)
    return [sorted(row) for row in rows]


def make_collator(
    tokenizer: Any,
    seq_len: int,
    packing: bool,
    *,
    row_tokens: int | None = None,
    attention_mask: bool = True,
    pad_to_multiple_of: int = 1,
) -> Callable[[list[dict]], dict]:
    """Build the collate function for a list of {"input_ids", "labels"} examples.

    packing=True: examples back to back with no padding between them, in rows of at most
    `row_tokens` (default seq_len) tokens; `position_ids` restart at 0 for every example and
    the label of each example's first token is -100, so the last token of one example is never
    trained to predict the first token of the next. Rows shorter than the longest are filled
    with a padding segment that has its own positions (so nothing attends across into it) and
    -100 labels. A step then costs the examples' total length, not count x longest.
    packing=False: right-padded to the longest example in the batch (not to seq_len), with an
    attention_mask and -100 labels on padding. attention_mask=False leaves the mask out: under a
    causal mask a real token only sees tokens before it, and right padding comes after every real
    token, so the mask changes nothing for real tokens, while without it SDPA can take its flash
    kernel (a mask forces the slower memory-efficient kernel). Use it with
    length_grouped_batches so there is little padding to compute.
    Each example is truncated to seq_len tokens first.
    """
    import torch

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    capacity = row_tokens or seq_len

    def collate_packed(examples: list[dict]) -> dict:
        items = [_truncate(e, seq_len) for e in examples]
        items = [item for item in items if item[0]]
        rows = pack_rows([len(ids) for ids, _ in items], capacity) if items else [[]]
        width = max(sum(len(items[i][0]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                ids, labs = items[i]
                n = len(ids)
                input_ids[r, at : at + n] = torch.tensor(ids, dtype=torch.long)
                labels[r, at + 1 : at + n] = torch.tensor(labs[1:], dtype=torch.long)
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}

    def collate_padded(examples: list[dict]) -> dict:
        rows = [_truncate(e, seq_len) for e in examples]
        width = max((len(ids) for ids, _ in rows), default=0)
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, labs) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, : len(labs)] = torch.tensor(labs, dtype=torch.long)
            mask[i, : len(ids)] = 1
        if not with_mask:
            # Plain 0..width-1 positions (what the model assumes without them); trl's
            # trainer wants either a mask or positions to count tokens.
            positions = torch.arange(width, dtype=torch.long).expand(len(rows), width)
            return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    with_mask = attention_mask
    return collate_packed if packing else collate_padded


def _pad_token(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    return pad_id


def _varlen_row(items: list[tuple[list[int], list[int]]], width: int, pad_id: int):
    """(input_ids, labels, position_ids, segment lengths) of one padding-free row of `width`.

    The examples go back to back, each example's positions restarting at 0 and its first
    token's label -100; the rest of the row is one padding segment with its own positions and
    -100 labels."""
    import torch

    input_ids = torch.full((width,), pad_id, dtype=torch.long)
    labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((width,), dtype=torch.long)
    segments, at = [], 0
    for ids, labs in items:
        n = len(ids)
        input_ids[at : at + n] = torch.tensor(ids, dtype=torch.long)
        labels[at + 1 : at + n] = torch.tensor(labs[1:], dtype=torch.long)
        position_ids[at : at + n] = torch.arange(n)
        segments.append(n)
        at += n
    if at < width:
        position_ids[at:] = torch.arange(width - at)
        segments.append(width - at)
    return input_ids, labels, position_ids, segments


def make_varlen_collator(
    tokenizer: Any, seq_len: int, *, row_tokens: int | None = None, pad_to_multiple_of: int = 1
) -> Callable[[list[dict]], dict]:
    """Collate a micro-batch into one padding-free row for varlen attention (attention.py).

    The examples go back to back in the order given, each truncated to seq_len, with
    `position_ids` restarting at 0 and the label of each example's first token set to -100 (the
    last token of one example never learns to predict the next example's first). The row is
    then filled up to `row_tokens` (the micro-batch's token budget; or to a multiple of
    `pad_to_multiple_of` when None) with one padding segment, so every step has the same shape.
    The batch carries the segment boundaries as `cu_seq_lens_q/k` and `max_length_q/k`; the
    padding segment is a segment of its own, attends only to itself and carries no loss.
    """
    from .attention import boundaries

    pad_id = _pad_token(tokenizer)

    def collate(examples: list[dict]) -> dict:
        items = [item for item in (_truncate(e, seq_len) for e in examples) if item[0]]
        total = sum(len(ids) for ids, _ in items)
        width = row_tokens or -(-max(total, 1) // pad_to_multiple_of) * pad_to_multiple_of
        if total > width:
            raise ValueError(
                f"a micro-batch of {total} tokens does not fit a packed row of "
                f"{width}; the batch sampler must respect the token budget"
            )
        input_ids, labels, position_ids, segments = _varlen_row(items, width, pad_id)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            **boundaries(segments),
        }

    return collate


ROWS_KEY = "micro_rows"
"""The key of a step batch (make_step_collator) that lists its rows; never a model input."""


def make_step_collator(
    tokenizer: Any, seq_len: int, row_tokens: int, *, pad_to_multiple_of: int = 1
) -> Callable[[list[dict]], dict]:
    """Collate one optimizer step's whole examples into as few padding-free rows as fit
    `row_tokens` real tokens each: the unpacked path (spec.training.packing false).

    Why: the planner bounds memory by a micro-batch of N examples of seqLength tokens, but
    real instruction examples are a few hundred tokens, so N of them made rows of ~1,300
    tokens, too small to keep an H200 busy (host-bound: 3,010 tokens/s unpacked against 9,880
    packed). Here a step's examples are bin-packed first-fit decreasing (pack_rows) into rows
    of at most `row_tokens` = micro-batch x seqLength real tokens, the plan's memory bound,
    each example truncated to seq_len first (so each fits a row): usually one or two rows per
    step instead of one per micro-batch. Every row ends in a padding segment up to a multiple
    of `pad_to_multiple_of` (bounding the number of shapes) and is built like
    make_varlen_collator's row. Because an example never crosses a row and the trainer
    normalises every row by the whole step's token count, the split changes only how the step
    is executed, not its loss or gradients.

    The batch is the step's rows side by side as one varlen row (`input_ids`, `labels`,
    `position_ids`, `cu_seq_lens_q/k`, `max_length_q/k`), so whatever counts tokens or
    loss items over a batch sees the whole step; ROWS_KEY lists the rows, each a dict with its
    `start` and `end` in that row, the number of trained `items` (labels after the causal
    shift), and its own segment boundaries, all computed here on the host so nothing waits on
    the GPU. The trainer (train.py) runs the rows one by one and strips the key before any
    forward.
    """
    import torch

    from .attention import boundaries

    pad_id = _pad_token(tokenizer)

    def collate(examples: list[dict]) -> dict:
        items = [item for item in (_truncate(e, seq_len) for e in examples) if item[0]]
        groups = pack_rows([len(ids) for ids, _ in items], row_tokens) if items else [[]]
        parts, segments, rows, at = [], [], [], 0
        for group in groups:
            members = [items[i] for i in group]
            total = sum(len(ids) for ids, _ in members)
            width = -(-max(total, 1) // pad_to_multiple_of) * pad_to_multiple_of
            input_ids, labels, position_ids, row_segments = _varlen_row(members, width, pad_id)
            parts.append((input_ids, labels, position_ids))
            segments += row_segments
            rows.append(
                {
                    "start": at,
                    "end": at + width,
                    "items": int((labels[1:] != IGNORE_INDEX).sum()),
                    **boundaries(row_segments),
                }
            )
            at += width
        input_ids, labels, position_ids = (
            torch.cat(column)[None] for column in zip(*parts, strict=True)
        )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            **boundaries(segments),
            ROWS_KEY: rows,
        }

    return collate


BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def step_row(batch: dict, row: dict) -> dict:
    """The model inputs of one row of a step batch (make_step_collator): views of the step's
    per-token tensors over the row, and the row's own boundaries."""
    width = batch["input_ids"].shape[1]
    inputs = {}
    for key, value in batch.items():
        if key == ROWS_KEY or key in BOUNDARY_KEYS:
            continue
        per_token = getattr(value, "dim", lambda: 0)() >= 2 and value.shape[1] == width
        inputs[key] = value[:, row["start"] : row["end"]] if per_token else value
    inputs.update({key: row[key] for key in BOUNDARY_KEYS})
    return inputs


def packed_batches(
    lengths: Sequence[int], max_tokens: int, *, lookahead: int = 64
) -> list[list[int]]:
    """Fill micro-batches of at most `max_tokens` tokens, in the order given, for packed rows.

    When the next example does not fit, up to `lookahead` later ones are tried before the
    micro-batch is closed, which fills rows to ~99% instead of leaving on average half an
    example empty; order otherwise stays as given (reproducible, comparable across runs).
    An example longer than max_tokens gets a micro-batch of its own (the collator truncates
    to seq_len, and the planner's budget is at least seq_len).
    """
    waiting: list[int] = []  # examples passed over, oldest first; they go first next time
    batches: list[list[int]] = []
    nxt, n = 0, len(lengths)
    while waiting or nxt < n:
        batch: list[int] = []
        used = 0
        kept: list[int] = []
        # the examples passed over last time first, then new ones until the row is full or
        # `lookahead` examples have been passed over
        candidates = iter(waiting)
        while True:
            i = next(candidates, None)
            if i is None:
                if nxt >= n or len(kept) > lookahead or used >= max_tokens:
                    break
                i, nxt = nxt, nxt + 1
            if not batch or used + lengths[i] <= max_tokens:
                batch.append(i)
                used += lengths[i]
            else:
                kept.append(i)
        batches.append(batch)
        waiting = kept
    return batches


class PackedBatchSampler:
    """A DataLoader batch_sampler of micro-batches filled to a token budget, for packed rows.

    Each epoch shuffles the examples with seed + epoch (as the Trainer's own sampler would)
    and fills micro-batches of at most `max_tokens` tokens (packed_batches). Pair it with
    make_varlen_collator(row_tokens=max_tokens): every step is one row of exactly the budget,
    the planner's micro-batch x seqLength, so memory stays at the plan and the shape never
    changes.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        seq_len: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.lengths = [min(n, seq_len) if seq_len else n for n in lengths]
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        import random

        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        groups = packed_batches([self.lengths[i] for i in order], self.max_tokens)
        return [[order[j] for j in g] for g in groups]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def example_tokens(examples: Iterable[dict], seq_len: int) -> int:
    """Real tokens the examples contribute after truncation: what tokens/s counts."""
    return sum(min(len(e["input_ids"]), seq_len) for e in examples)


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


def length_grouped_batches(
    lengths: Sequence[int], max_tokens: int, *, window: int = 1024, seed: int = 0, multiple: int = 1
) -> list[list[int]]:
    """Micro-batches of similar-length examples whose padded size (rows x longest) fits max_tokens.

    Examples are sorted by length inside windows of `window` examples (not globally, so the data
    order stays mostly as given), cut into micro-batches, and the micro-batches of each window are
    shuffled with a fixed seed so long and short ones alternate (steady memory and no length
    ordering effect on the loss). Padding drops to a few percent of the tokens. With `multiple`
    the padded width is counted rounded up to that multiple (pair it with the collator's
    pad_to_multiple_of), which bounds how many distinct batch shapes a run sees.
    """
    import random

    rng = random.Random(seed)
    batches: list[list[int]] = []
    for start in range(0, len(lengths), window):
        idx = sorted(range(start, min(start + window, len(lengths))), key=lambda i: lengths[i])
        group: list[int] = []
        longest = 0
        window_batches = []
        for i in idx:
            n = -(-lengths[i] // multiple) * multiple
            if group and max(longest, n) * (len(group) + 1) > max_tokens:
                window_batches.append(group)
                group, longest = [], 0
            group.append(i)
            longest = max(longest, n)
        if group:
            window_batches.append(group)
        rng.shuffle(window_batches)
        batches += window_batches
    return batches


class TokenBudgetBatchSampler:
    """A DataLoader batch_sampler of length-grouped micro-batches within a token budget.

    For the trainer: `DataLoader(ds, batch_sampler=TokenBudgetBatchSampler(lengths, budget,
    multiple=64), collate_fn=make_collator(tok, seq_len, packing=False, attention_mask=False,
    pad_to_multiple_of=64))` gives every step about `budget` tokens (so the planner's memory bound
    holds: budget = micro_batch_size x seq_len), little padding, flash attention, and few distinct
    batch shapes (on an H200 the first step with a new shape cost 0.2-0.25 s extra).
    A new epoch re-shuffles the micro-batches' order with seed + epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        seq_len: int | None = None,
        multiple: int = 64,
        window: int = 1024,
        seed: int = 0,
    ):
        self.lengths = [min(n, seq_len) if seq_len else n for n in lengths]
        self.max_tokens, self.multiple, self.window, self.seed = max_tokens, multiple, window, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        return length_grouped_batches(
            self.lengths,
            self.max_tokens,
            window=self.window,
            seed=self.seed + self.epoch,
            multiple=self.multiple,
        )

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


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
