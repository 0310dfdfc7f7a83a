"""Measured calibration points: one JSON object per run, turned into planner inputs.

The records under tests/data/calibration/*.jsonl come from two kinds of script (the
benchmark's runs of the worker's configuration on an H200, and the reference runs of the
common recipe, bench/reference/), which spell their fields differently; this module accepts
the spellings both use so that a replay compares the prediction for exactly the
configuration that was measured. Pure: parsing only, no file I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .arch import ModelArch, arch_from_config_json
from .memory import TrainingShape

# Canonical name -> accepted spellings (first found wins).
ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("shape", "model_shape", "model", "name", "shape_name"),
    "hidden_size": ("hidden", "hidden_size"),
    "intermediate_size": ("intermediate", "intermediate_size"),
    "num_hidden_layers": ("layers", "num_layers", "num_hidden_layers"),
    "num_attention_heads": ("heads", "num_heads", "num_attention_heads"),
    "num_key_value_heads": ("kv_heads", "num_kv_heads", "num_key_value_heads"),
    "vocab_size": ("vocab", "vocab_size"),
    "tie_word_embeddings": ("tied", "tie_word_embeddings"),
    "head_dim": ("head_dim",),
    "model_type": ("model_type",),
    "method": ("method", "mode"),
    "r": ("r", "lora_r", "rank"),
    "target_modules": ("target_modules", "targets"),
    "lora_dropout": ("lora_dropout", "dropout"),
    "seq_len": ("seq_len", "seq_length", "seq"),
    "micro_batch": ("micro_batch", "mb", "micro_batch_size"),
    "gradient_accumulation": ("gradient_accumulation", "ga", "grad_accum"),
    "grad_ckpt": ("grad_ckpt", "gradient_checkpointing", "gc"),
    "fused_ce": ("fused_ce", "liger_fused_ce", "fused_linear_cross_entropy"),
    "fused_kernels": ("fused_kernels", "liger", "liger_kernels"),
    "packing": ("packing", "padding_free"),
    "optimizer": ("optimizer", "optim"),
    "adapter_bytes": ("adapter_bytes",),
    "upcast_non_quantized": ("upcast_non_quantized", "fp32_upcast", "kbit_fp32_upcast"),
    "lean_lora": ("lean_lora",),
    "attention_mask": ("attention_mask",),
    "varlen": ("varlen",),
    "varlen_grouped_kv": ("varlen_grouped_kv",),
    "double_quant": ("double_quant",),
    "peak_reserved_bytes": ("peak_reserved_bytes",),
    "peak_allocated_bytes": ("peak_allocated_bytes", "peak_alloc_bytes"),
    "cuda_context_bytes": ("cuda_context_bytes",),
}

GiB = 2**30


class CalibrationRecordError(ValueError):
    """A calibration record lacks a field needed to replay it."""


def _get(record: Mapping[str, Any], canonical: str, default: Any = None) -> Any:
    for key in ALIASES[canonical]:
        if key in record and record[key] is not None:
            return record[key]
    return default


@dataclass(frozen=True)
class CalibrationPoint:
    arch: ModelArch
    shape: TrainingShape
    peak_reserved_bytes: int
    peak_allocated_bytes: int | None
    cuda_context_bytes: int | None
    label: str
    source: str


def _bytes(record: Mapping[str, Any], canonical: str, gib_key: str) -> int | None:
    value = _get(record, canonical)
    if value is None and record.get(gib_key) is not None:
        value = float(record[gib_key]) * GiB
    return None if value is None else int(value)


def point_from_record(record: Mapping[str, Any], source: str = "") -> CalibrationPoint:
    """Planner inputs and the measured peak of one calibration record."""
    config = {
        canonical: _get(record, canonical)
        for canonical in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
            "head_dim",
            "model_type",
        )
    }
    name = str(_get(record, "name", "calibration-shape"))
    arch = arch_from_config_json({k: v for k, v in config.items() if v is not None}, name=name)

    mode = str(_get(record, "method", "lora")).lower()
    method = "qlora" if mode.startswith("qlora") else "lora"
    ckpt = _get(record, "grad_ckpt")
    if ckpt is None:
        raise CalibrationRecordError(f"{source}: record {dict(record)!r} lacks grad_ckpt")
    targets = _get(record, "target_modules", ["all-linear"])
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    fused_kernels = bool(_get(record, "fused_kernels", False))
    shape = TrainingShape(
        method=method,
        lora_r=int(_get(record, "r", 16)),
        target_modules=tuple(targets),
        lora_dropout=float(_get(record, "lora_dropout", 0.05)),
        seq_len=int(_get(record, "seq_len", 512)),
        micro_batch=int(_get(record, "micro_batch", 1)),
        gradient_accumulation=int(_get(record, "gradient_accumulation", 1)),
        gradient_checkpointing=bool(ckpt),
        fused_ce=bool(_get(record, "fused_ce", fused_kernels)),
        fused_kernels=fused_kernels,
        packing=bool(_get(record, "packing", False)),
        optimizer=str(_get(record, "optimizer", "adamw_torch")),
        adapter_bytes=int(_get(record, "adapter_bytes", 4)),
        upcast_non_quantized=bool(_get(record, "upcast_non_quantized", False)),
        # Records that do not say were measured before the worker's lean LoRA layers existed
        # (the first H200 grid, the common recipe): peft's own forward.
        lean_lora=bool(_get(record, "lean_lora", False)),
        # Records that do not say were packed rows with block-diagonal masks (before varlen).
        varlen=bool(_get(record, "varlen", False)),
        # Records that do not say were measured while varlen rows still repeated K/V.
        varlen_grouped_kv=bool(_get(record, "varlen_grouped_kv", False)),
        # Calibration runs train on full-length samples: without packing there is no padding,
        # so transformers drops the all-ones mask; masked packed rows always carry one.
        attention_mask=bool(
            _get(
                record,
                "attention_mask",
                _get(record, "packing", False) and not _get(record, "varlen", False),
            )
        ),
        double_quant=bool(_get(record, "double_quant", True)),
    )
    reserved = _bytes(record, "peak_reserved_bytes", "peak_reserved_GiB")
    if reserved is None:
        raise CalibrationRecordError(
            f"{source}: record {dict(record)!r} lacks peak_reserved_bytes (or peak_reserved_GiB)"
        )
    label = (
        f"{arch.name} {method} r={shape.lora_r} seq={shape.seq_len} mb={shape.micro_batch} "
        f"ckpt={'on' if shape.gradient_checkpointing else 'off'}"
        f"{' packed' if shape.packing else ''}"
    )
    return CalibrationPoint(
        arch=arch,
        shape=shape,
        peak_reserved_bytes=reserved,
        peak_allocated_bytes=_bytes(record, "peak_allocated_bytes", "peak_alloc_GiB"),
        cuda_context_bytes=_get(record, "cuda_context_bytes"),
        label=label,
        source=source,
    )


def is_measurement(record: Mapping[str, Any]) -> bool:
    """Records without a measured peak (notes, runs marked `error` or `oom`) are skipped."""
    return (
        not record.get("error")
        and not record.get("oom")
        and (_get(record, "peak_reserved_bytes") is not None or "peak_reserved_GiB" in record)
    )
