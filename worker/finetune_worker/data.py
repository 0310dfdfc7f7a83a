"""Training data: load records, render each format, tokenize with loss masks.

Four formats, each turned into `input_ids` and `labels` (-100 where no loss is taken):
  alpaca      instruction / input / output      loss on the response
  chat        messages (role, content)          loss on assistant turns, via the chat template
  completion  prompt / completion               loss on the completion
  text        text                              loss on every token
With `completion_only_loss=False` every token of every format carries loss.
Problems in the data raise DataError naming the file, the row and the field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from finetune_api.finetunejob import FieldMapping

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat", "completion", "text")
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
CHAT_ROLES = ("system", "user", "assistant", "tool")

# The Stanford Alpaca prompt, the layout alpaca-style datasets were written for.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


@dataclass(frozen=True)
class TokenizedSplits:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    dropped: int  # examples with no loss tokens left after truncation


def load_records(
    source: str,
    *,
    split: str = "train",
    token: str | None = None,
    revision: str | None = None,
    subset: str | None = None,
) -> Dataset:
    """A `datasets.Dataset` from a local file/directory or a Hub dataset id."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(
                    f"dataset file {source!r} has extension {path.suffix!r}; expected one of "
                    f"{sorted(_LOCAL_BUILDERS)}"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), subset, split=split)
        if source.startswith(("/", "./", "../")):
            raise DataError(
                f"dataset path {source!r} does not exist; check the volume mount "
                "and the path in spec.dataset"
            )
        return datasets.load_dataset(source, subset, split=split, token=token, revision=revision)
    except DataError:
        raise
    except Exception as exc:  # datasets wraps parse errors in many types
        cause = exc.__cause__ or exc
        raise DataError(
            f"cannot read dataset {source!r} (split {split!r}): {type(cause).__name__}: {cause}"
        ) from exc


def rename_fields(records: Dataset, fmt: str, mapping: FieldMapping | None, source: str) -> Dataset:
    """Apply spec.dataset.fields: the user's column names -> the format's standard names."""
    if mapping is None:
        return records
    renames = {}
    for standard in REQUIRED_FIELDS.get(fmt, ()) + (("input",) if fmt == "alpaca" else ()):
        column = getattr(mapping, standard, None)
        if column and column != standard:
            if column not in records.column_names:
                raise DataError(
                    f"spec.dataset.fields.{standard} names column {column!r}, but "
                    f"dataset {source!r} has only {records.column_names}"
                )
            renames[column] = standard
    if renames:
        clashing = [c for c in renames.values() if c in records.column_names]
        records = records.remove_columns(clashing).rename_columns(renames)
    return records


def check_fields(records: Dataset, fmt: str, source: str) -> None:
    """Every required field exists and holds the right type, or DataError names the row."""
    if fmt not in FORMATS:
        raise DataError(f"dataset format {fmt!r} is not supported; expected one of {FORMATS}")
    if len(records) == 0:
        raise DataError(f"dataset {source!r} has no rows")
    missing = [f for f in REQUIRED_FIELDS[fmt] if f not in records.column_names]
    if missing:
        raise DataError(
            f"dataset {source!r} is declared as format {fmt!r} but has no column(s) {missing}; "
            f"its columns are {records.column_names}. Fix the data or spec.dataset.format."
        )
    for row, record in enumerate(records):
        for field in REQUIRED_FIELDS[fmt]:
            value = record[field]
            if fmt == "chat":
                problem = _messages_problem(value)
            else:
                problem = (
                    None
                    if isinstance(value, str)
                    else "is missing or null"
                    if value is None
                    else f"is a {type(value).__name__}, not a string"
                )
            if problem:
                raise DataError(f"dataset {source!r} row {row}: field {field!r} {problem}")


def _messages_problem(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "must be a non-empty list of {role, content} messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} must have a string 'content'"
        if message.get("role") not in CHAT_ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {CHAT_ROLES}"
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant message, so there is nothing to learn"
    return None


def _prompt_completion(fmt: str, record: dict) -> tuple[str, str]:
    if fmt == "alpaca":
        extra = record.get("input") or ""
        template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
        return template.format(instruction=record["instruction"], input=extra), record["output"]
    if fmt == "completion":
        return record["prompt"], record["completion"]
    return "", record["text"]


def _ids(encoded) -> list[int]:
    # apply_chat_template returns a BatchEncoding or a plain list depending on version
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def _chat_ids(
    tokenizer, messages: list[dict], completion_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels for a conversation; assistant spans found by rendering prefixes.

    The assistant span is what the full render adds after the prefix rendered with a
    generation prompt, so it includes the template's end-of-turn token (the model must
    learn to stop).
    """
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True))
    if not completion_only:
        return full, list(full)
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(
            _ids(
                tokenizer.apply_chat_template(
                    messages[:i], tokenize=True, return_dict=True, add_generation_prompt=True
                )
            )
        )
        end_ids = _ids(
            tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)
        )
        if full[: len(end_ids)] != end_ids:
            raise DataError(
                "the tokenizer's chat template does not render conversations "
                "prefix by prefix, so assistant turns cannot be located for "
                "completion-only loss; use a tokenizer whose template does "
                "(spec.model.tokenizer) or the text format"
            )
        labels[start : len(end_ids)] = full[start : len(end_ids)]
    return full, labels


def tokenize_example(
    record: dict,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    completion_only: bool = True,
) -> dict[str, list[int]]:
    eos = tokenizer.eos_token_id
    if fmt == "chat":
        input_ids, labels = _chat_ids(tokenizer, record["messages"], completion_only)
    else:
        prompt, completion = _prompt_completion(fmt, record)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        # special tokens (BOS) go before the prompt only, so the completion is tokenized bare
        completion_ids = tokenizer(completion, add_special_tokens=not prompt)["input_ids"]
        if eos is not None and (not completion_ids or completion_ids[-1] != eos):
            completion_ids = [*completion_ids, eos]
        input_ids = prompt_ids + completion_ids
        if completion_only and fmt != "text":
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        else:
            labels = list(input_ids)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_records(
    records: Dataset,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    source: str,
    completion_only: bool = True,
) -> Dataset:
    """Tokenized dataset (input_ids, labels); rows left without loss tokens are dropped."""
    check_fields(records, fmt, source)

    def render(record):
        return tokenize_example(
            record, fmt, tokenizer, max_length=max_length, completion_only=completion_only
        )

    tokenized = records.map(
        render,
        remove_columns=records.column_names,
        desc=f"tokenizing {fmt}",
        load_from_cache_file=False,
    )
    return tokenized.filter(
        lambda ex: any(t != IGNORE_INDEX for t in ex["labels"][1:]), load_from_cache_file=False
    )


def prepare_splits(
    records: Dataset,
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    source: str,
    completion_only: bool = True,
    eval_records: Dataset | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
) -> TokenizedSplits:
    """Tokenize the training data and produce the eval split.

    The eval split is either given (`eval_records`) or carved from the training rows
    (`eval_fraction`), at least one row, never all of them.
    """
    if eval_records is None and eval_fraction > 0:
        if len(records) < 2:
            raise DataError(
                f"dataset {source!r} has {len(records)} row(s); an eval fraction "
                f"of {eval_fraction} needs at least 2"
            )
        n_eval = min(max(1, round(len(records) * eval_fraction)), len(records) - 1)
        parts = records.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        records, eval_records = parts["train"], parts["test"]
    train = tokenize_records(
        records,
        fmt,
        tokenizer,
        max_length=max_length,
        source=source,
        completion_only=completion_only,
    )
    dropped = len(records) - len(train)
    if len(train) == 0:
        raise DataError(
            f"no training example of {source!r} keeps a loss token within "
            f"{max_length} tokens; raise the sequence length or shorten prompts"
        )
    if dropped:
        log.warning(
            "%d of %d examples have no completion tokens within %d tokens and were dropped",
            dropped,
            len(records),
            max_length,
        )
    evaluation = None
    if eval_records is not None:
        evaluation = tokenize_records(
            eval_records,
            fmt,
            tokenizer,
            max_length=max_length,
            source=f"{source} (eval)",
            completion_only=completion_only,
        )
        if len(evaluation) == 0:
            evaluation = None
    return TokenizedSplits(train=train, eval=evaluation, dropped=dropped)
