"""Variable-length attention for packed micro-batches: no padding, no mask, flash kernel.

A packed micro-batch is one row of many examples back to back. Plain SDPA has to be told where
each example ends through a tokens x tokens mask, which forces its slower memory-efficient
kernel and computes attention over the whole row; length-grouped padded batches keep the flash
kernel but compute padding and change shape every step (measured on an H200 in
docs/perf-notes.md: both cost 10-20%). Flash attention's variable-length form takes the
examples' boundaries as cumulative lengths (`cu_seq_lens`) instead: each example attends only
to itself, causally, and the row has a fixed length (the token budget), so every step has the
same shape.

The boundaries travel with the batch as transformers' own flash-attention keyword arguments
(`cu_seq_lens_q/k`, `max_length_q/k`, computed on the host by the collator, so nothing waits
on the GPU), which transformers passes from the model's forward down to each attention call.
`register()` adds the function under the name VARLEN; a model whose config names it runs it.
On the GPU it calls PyTorch's flash varlen kernel (torch >= 2.10); elsewhere it runs SDPA once
per example, the same mathematics, so the CPU tests exercise the same batches and code path.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn
    from transformers import PreTrainedModel

VARLEN = "finetune_varlen"


@functools.cache
def _varlen_kernel():
    """PyTorch's varlen flash attention and how this version spells "causal", or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.11: causal is a (-1, 0) window
        # It also takes grouped K/V as they are (fewer K/V heads than query heads): on an H200
        # with torch 2.11 the same output and gradients as repeated K/V, 7 % faster, and no
        # repeated copies kept for backward (bench/varlen_gqa_check.py).
        return varlen_attn, {"window_size": (-1, 0)}, True
    if "is_causal" in params:  # torch 2.10
        return varlen_attn, {"is_causal": True}, "enable_gqa" in params
    return None


def supported(device: Any) -> bool:
    """Whether packed micro-batches can run varlen attention on `device` at full speed.

    On CUDA that needs PyTorch's kernel; on the CPU the per-example fallback is exact (and
    only used by tests and tiny models, where its speed does not matter).
    """
    kind = getattr(device, "type", str(device))
    return kind != "cuda" or _varlen_kernel() is not None


def register() -> str:
    """Make VARLEN a valid `attn_implementation` for transformers models; returns the name.

    No mask function is registered under the name, so transformers builds no attention mask
    for such a model (masking_utils returns None for implementations it has no mask for).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    return VARLEN


def use_varlen(model: PreTrainedModel | PeftModel) -> None:
    """Switch a loaded (or peft-wrapped) model to varlen attention."""
    register()
    model.config._attn_implementation = VARLEN
    base = getattr(model, "get_base_model", None)
    if base is not None:
        base().config._attn_implementation = VARLEN


def boundaries(lengths: list[int]) -> dict[str, Any]:
    """The keyword arguments a packed row carries: cumulative lengths (int32) and the longest.

    `lengths` are the segments of the row in order, their sum the row's length. Keys and
    queries are the same tokens, so q and k share one tensor.
    """
    import torch

    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    longest = max(lengths, default=0)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, H, T, D) in, (B, T, H, D) and no weights out.

    Without segment boundaries (an eval or generate call on ordinary padded batches) this is
    plain SDPA with whatever mask transformers passed, so a model switched to VARLEN still
    runs every batch it ran before.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if dropout:
        raise ValueError(
            "attention dropout is not supported with packed micro-batches; "
            "Llama-style models train with attention_dropout 0"
        )
    import torch

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    kernel = _varlen_kernel() if query.is_cuda else None
    if kernel is None:
        out = _per_segment(q, k, v, cu, scaling)
    else:
        varlen_attn, causal, grouped = kernel
        groups = q.shape[1] // k.shape[1]
        extra = dict(causal)
        if groups > 1 and grouped and "enable_gqa" in inspect.signature(varlen_attn).parameters:
            extra["enable_gqa"] = True
        elif groups > 1 and not grouped:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        longest = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
        cu = cu.to(device=q.device, dtype=torch.int32)
        out = varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu,
            cu,
            longest,
            longest,
            scale=scaling,
            **extra,
        )
    return out.unsqueeze(0), None


def _per_segment(q, k, v, cu, scaling):
    """Reference: causal SDPA over each segment on its own (what the kernel computes)."""
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds = [int(x) for x in cu.tolist()]
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        if groups > 1:
            ks, vs = (t.repeat_interleave(groups, dim=0) for t in (ks, vs))
        outs.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(
                0, 1
            )
        )
    return torch.cat(outs, dim=0)
