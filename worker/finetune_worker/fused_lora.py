"""One autograd node per LoRA projection: the frozen matmul, dropout and both adapter matmuls.

A QLoRA step on short rows is bound by the host, not the GPU (docs/perf-notes.md, "QLoRA's
small steps"): each of the seven adapted projections per layer runs, three times per step
(forward, checkpointed recompute, backward), through bitsandbytes' Python matmul wrapper, a
dropout module, an autocast cast and an adapter Linear per matrix, and an addmm — each its own
autograd node with its own Python and dispatcher work. `LoraProjection` does the same arithmetic
in one node: the same kernels in the same order (so the same numbers), less host work around
them. The backward pass computes exactly what autograd computes from peft's forward:

    y  = x W^T + s (drop(x) A^T) B^T          (W frozen: bf16, or NF4 dequantised per use)
    dB = s dy^T h,   dh = s dy B,   dA = dh^T drop(x),   dx = dy W + drop'(dh A)

where h = drop(x) A^T is saved from the forward pass (tokens x r, small).
"""

from __future__ import annotations

from typing import Any

import torch


def frozen_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """The base projection's weight as the compute dtype: itself (bf16) or dequantised (NF4)."""
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    from bitsandbytes import functional as bnbf

    return bnbf.dequantize_4bit(weight, quant_state)


def fusable_base(base_layer: Any) -> bool:
    """Whether a LoRA layer's frozen base can run inside `LoraProjection`: a plain bf16 Linear
    or a bitsandbytes 4-bit Linear computing in bf16. Other bases (FP8, 8-bit) keep the
    module-by-module path."""
    if type(base_layer) is torch.nn.Linear:
        weight = base_layer.weight
        return type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    quant_state = getattr(getattr(base_layer, "weight", None), "quant_state", None)
    return (
        isinstance(base_layer, bnb.nn.Linear4bit)
        and quant_state is not None
        and quant_state.dtype == torch.bfloat16
    )


def fusable_adapter(lora_a: Any, lora_b: Any, dropout: Any) -> bool:
    """Whether the adapter's parts can be read as plain tensors: torch Linears without bias (a
    wrapped matrix, as under FSDP, must be called for its weight to be gathered) and a dropout
    that is nn.Dropout or Identity. Checked per call: FSDP wraps after the layers are patched."""
    return (
        type(lora_a) is torch.nn.Linear
        and type(lora_b) is torch.nn.Linear
        and lora_a.bias is None
        and lora_b.bias is None
        and type(dropout) in (torch.nn.Dropout, torch.nn.Identity)
    )


class LoraProjection(torch.autograd.Function):
    """y = base(x) + scaling * dropout(x) A^T B^T as one autograd node (see the module doc)."""

    @staticmethod
    def forward(ctx, x, base_layer, bias, a, b, scaling: float, p: float):
        dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])
        y = torch.nn.functional.linear(rows, frozen_weight(base_layer), bias)
        mask = None
        if p > 0:
            dropped, mask = torch.native_dropout(rows, p, True)
        else:
            dropped = rows
        a16, b16 = a.to(dtype), b.to(dtype)
        h = torch.mm(dropped, a16.t())
        y = torch.addmm(y, h, b16.t(), alpha=scaling)
        ctx.base_layer, ctx.scaling, ctx.p = base_layer, scaling, p
        ctx.x_shape = x.shape
        ctx.save_for_backward(dropped, mask, h, a16, b16)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dropped, mask, h, a16, b16 = ctx.saved_tensors
        s = ctx.scaling
        dy = dy.reshape(-1, dy.shape[-1])
        # The products autograd forms through peft's forward, in the layouts it picks: addmm's
        # backward scales both input gradients by alpha; B^T is a transposed view, so its
        # gradient is formed as dy^T h.
        dh = torch.mm(dy, b16).mul_(s)
        db = torch.mm(dy.t(), h).mul_(s)
        da = torch.mm(dh.t(), dropped)
        dx = None
        if ctx.needs_input_grad[0]:
            dx_adapter = torch.mm(dh, a16)
            if mask is not None:
                dx_adapter = torch.ops.aten.native_dropout_backward(
                    dx_adapter, mask, 1.0 / (1.0 - ctx.p)
                )
            dx = torch.mm(dy, frozen_weight(ctx.base_layer)).add_(dx_adapter)
            dx = dx.view(ctx.x_shape)
        return dx, None, None, da, db, None, None


def lora_projection(module: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """Run peft LoraLayer `module`'s active adapter `name` on `x` as one `LoraProjection`."""
    base = module.base_layer
    dropout = module.lora_dropout[name]
    p = float(dropout.p) if type(dropout) is torch.nn.Dropout and dropout.training else 0.0
    bias = base.bias
    if bias is not None:
        bias = bias.to(x.dtype)
    return LoraProjection.apply(
        x,
        base,
        bias,
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        float(module.scaling[name]),
        p,
    )
