"""An FP8 frozen base for LoRA: `plan.method: fp8`.

LoRA never updates the base, so its projections need no weight gradient and no
high-precision master copy: the forward matmul and the input-gradient matmul are all the base
does, and both can run in FP8 on GPUs that have FP8 tensor cores (compute capability 8.9 and
newer: Ada, Hopper, Blackwell). Each frozen projection holds its weight in e4m3 with one fp32
scale per output channel, half the bytes of bf16; the adapters, norms, embeddings and the
output head stay as they are (fp32 adapters, bf16 rest).

    forward        y  = (x_q  @ W_q^T) * s_x * s_w        x_q: x in e4m3, one scale per row
    input grad     dx = (g'_q @ W_q)   * s_g'             g' = g * s_w, g'_q in e4m3 per row

Both are one `torch._scaled_mm` with row-wise scales (PyTorch's own FP8 GEMM; no custom
GEMM kernels). Scaling g by the weight's channel scales before quantising it moves the per-channel
scale off the contraction dimension of the backward GEMM, where it could not be applied. The
backward GEMM needs the weight column-major the other way round, so a transposed copy of one
projection's FP8 weight exists while its input gradient is computed (at most 59 MB on an 8B
model), rather than a second copy of every weight.

Quantising an activation is an absolute maximum, a division and a cast: three passes in eager
PyTorch, which cost more than FP8 saves on the GEMM (docs/perf-notes.md). On CUDA it is one
Triton kernel (`_quantize_rows_kernel`, a program per row). torch.compile of `quantize_rows`
made the same single kernel, but each call went through Dynamo's guards for the five shape and
layout variants a layer produces, about 0.2 ms of host time per call: with checkpointing that
left the GPU idle half of the step. On the CPU (tests) the same mathematics runs in eager
PyTorch.

q, k and v read the same input, as do gate and up: the forward pass quantises each input once
and the projections that share it reuse it (`_SharedInput`), 4 quantisations per layer instead
of 7.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from finetune_api.constants import FP8_MIN_COMPUTE_CAPABILITY

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
GEMM_MULTIPLE = 16
"""_scaled_mm wants every dimension a multiple of 16; rows are padded up to it."""
MIN_CAPABILITY = FP8_MIN_COMPUTE_CAPABILITY
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer (the planner's threshold too)."""


def supported(device: Any) -> tuple[bool, str]:
    """(whether FP8 GEMMs run on `device`, why not). CPUs run `_scaled_mm` as reference."""
    import torch

    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cuda":
        return hasattr(torch, "_scaled_mm"), "this PyTorch has no torch._scaled_mm"
    index = getattr(device, "index", None)
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return False, (
            f"{name} (compute capability {capability[0]}.{capability[1]}) has no FP8 tensor "
            "cores; FP8 needs 8.9 or newer (L4, L40S, H100, H200, B200)"
        )
    return True, ""


def quantize_rows(
    t: torch.Tensor, column_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale per row) for a 2-D tensor, optionally multiplied by a scale per
    column first. Each row is scaled so that its largest magnitude maps to E4M3_MAX."""
    import torch

    x = t.float()
    if column_scale is not None:
        x = x * column_scale
    scale = (x.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    return (x / scale).to(torch.float8_e4m3fn), scale


@functools.cache
def _quantize_rows_kernel():
    """The Triton kernel behind quantize_rows on CUDA (made on first use: no Triton on import).

    One program per row: the scaled row's absolute maximum in a first sweep, then the row
    divided by its scale and cast to e4m3 in a second (the row is back from L2 by then). The
    scale is the maximum times 1/448, as PyTorch computes a division by a Python number, and
    the row is divided round-to-nearest, so the values equal quantize_rows' bit for bit.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        x_ptr,
        col_ptr,
        out_ptr,
        scale_ptr,
        n_cols,
        stride_row,
        HAS_COL: tl.constexpr,
        BLOCK: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        src = x_ptr + row * stride_row
        dst = out_ptr + row * n_cols
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            v = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        # times the reciprocal, as PyTorch divides a tensor by a Python number
        scale = tl.maximum(tl.max(amax, axis=0) * (1.0 / FP8_MAX), 1e-12)
        tl.store(scale_ptr + row, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            v = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=mask, other=0.0)
            tl.store(dst + cols, tl.div_rn(v, scale).to(tl.float8e4nv), mask=mask)

    return kernel


def _quantize_triton(t: torch.Tensor, column_scale: torch.Tensor | None):
    import torch

    if t.stride(-1) != 1:
        t = t.contiguous()
    rows, cols = t.shape
    out = torch.empty((rows, cols), device=t.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=t.device, dtype=torch.float32)
    col = column_scale.reshape(-1).contiguous() if column_scale is not None else t
    if rows:
        _quantize_rows_kernel()[(rows,)](
            t,
            col,
            out,
            scale,
            cols,
            t.stride(0),
            HAS_COL=column_scale is not None,
            BLOCK=1024,
            FP8_MAX=E4M3_MAX,
            num_warps=4,
        )
    return out, scale


def _quantize(t: torch.Tensor, column_scale: torch.Tensor | None = None):
    if t.is_cuda:
        return _quantize_triton(t, column_scale)
    return quantize_rows(t, column_scale)


class _SharedInput:
    """The last quantised forward input, for the projections that read the same tensor.

    Keyed by the tensor object itself, held here so its memory cannot be reused by another
    tensor while the entry lives, and by its version counter, so an in-place change misses.
    One entry: the projections sharing an input are called one after another, and a
    projection that shares none (o, down) empties it, so no activation outlives its layer's
    forward because of it (under checkpointing that would raise the peak)."""

    def __init__(self) -> None:
        self.source = None
        self.version = -1
        self.value = None

    def quantize(self, x: torch.Tensor, flat: torch.Tensor):
        if self.source is x and self.version == x._version:
            return self.value
        value = _quantize(flat)
        self.source, self.version, self.value = x, x._version, value
        return value

    def clear(self) -> None:
        self.source, self.value = None, None


_shared_input = _SharedInput()

SHARED_INPUT_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
"""Projections of the Llama family (Llama, Mistral, Qwen, Gemma) that read the same tensor as
their siblings: attention's q/k/v the normed hidden state, the MLP's gate/up the other one."""


@functools.cache
def _ones(n: int, device: str):
    import torch

    return torch.ones(1, n, device=device, dtype=torch.float32)


def _pad_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    rows = t.shape[0]
    extra = -rows % GEMM_MULTIPLE
    if extra:
        import torch.nn.functional as F

        t = F.pad(t, (0, 0, 0, extra))
    return t, rows


@functools.cache
def _matmul_function():
    import torch

    class Fp8FrozenMatmul(torch.autograd.Function):
        """x @ W^T for a frozen FP8 weight: FP8 forward and input gradient, no weight grad."""

        @staticmethod
        def forward(ctx, x, weight, weight_scale, out_dtype, shares_input):
            ctx.save_for_backward(weight, weight_scale)
            ctx.in_shape, ctx.in_dtype = x.shape, x.dtype
            flat, rows = _pad_rows(x.reshape(-1, x.shape[-1]))
            if shares_input:
                x_q, x_scale = _shared_input.quantize(x, flat)
            else:
                _shared_input.clear()
                x_q, x_scale = _quantize(flat)
            out = torch._scaled_mm(
                x_q,
                weight.t(),
                scale_a=x_scale,
                scale_b=weight_scale.view(1, -1),
                out_dtype=out_dtype,
            )
            return out[:rows].view(*x.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            weight, weight_scale = ctx.saved_tensors
            flat, rows = _pad_rows(grad.reshape(-1, grad.shape[-1]))
            g_q, g_scale = _quantize(flat, weight_scale.view(1, -1))
            # (out, in) column-major: the transposed copy of this one weight
            weight_cm = weight.t().contiguous().t()
            dx = torch._scaled_mm(
                g_q,
                weight_cm,
                scale_a=g_scale,
                scale_b=_ones(weight.shape[1], str(grad.device)),
                out_dtype=ctx.in_dtype,
            )
            return dx[:rows].view(ctx.in_shape), None, None, None, None

    return Fp8FrozenMatmul


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    shares_input: bool = False,
) -> torch.Tensor:
    """y = x @ (weight * weight_scale[:, None])^T + bias with FP8 GEMMs, in the autocast dtype
    (bf16 on the worker's GPUs) or else x's. `shares_input`: x is also the input of the next
    projection called, which then reuses its quantisation."""
    import torch

    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    with torch.autocast(kind, enabled=False):
        out = _matmul_function().apply(x.to(dtype), weight, weight_scale, dtype, shares_input)
        if bias is not None:
            out = out + bias.to(dtype)
    return out


def _linear_class():
    import torch

    class Float8Linear(torch.nn.Linear):
        """A frozen nn.Linear whose weight is e4m3 with a fp32 scale per output channel.

        A subclass of nn.Linear so peft and transformers treat it as the projection it
        replaces (peft wraps it as a LoRA base layer); `weight` is the FP8 tensor itself."""

        shares_input = False
        """Set for SHARED_INPUT_PROJECTIONS: the quantised input is kept for the next one."""

        @classmethod
        def from_linear(cls, linear: torch.nn.Linear, device: Any = None) -> Float8Linear:
            device = device or linear.weight.device
            w = linear.weight.detach().to(device=device)
            w_q, scale = quantize_rows(w)
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device="meta",
            )
            layer.weight = torch.nn.Parameter(w_q, requires_grad=False)
            layer.register_buffer("weight_scale", scale.view(-1).contiguous())
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(
                    linear.bias.detach().to(device=device), requires_grad=False
                )
            return layer

        def forward(self, x):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.shares_input)

        def dequantized(self) -> torch.Tensor:
            """The weight this layer computes with, in fp32 (for tests and checks)."""
            return self.weight.float() * self.weight_scale.view(-1, 1)

    return Float8Linear


@functools.cache
def float8_linear_class() -> type[torch.nn.Linear]:
    """The FP8 Linear class (made on first use: importing this module needs no torch)."""
    return _linear_class()


def fp8_base_layers(peft_model: PeftModel, device: Any = None) -> int:
    """Replace the frozen base projection under every LoRA layer with its FP8 form, on `device`.

    Done after peft wrapped the model, so the adapters were created against the bf16 layer
    (peft moves new adapters to the base weight's dtype; an FP8 one would round their
    initialisation). Each bf16 weight is quantised on `device` and dropped at once, so a model
    loaded on the CPU never needs its bf16 weights on the GPU. Returns how many were replaced.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    cls = float8_linear_class()
    count = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            base = module.base_layer
            if type(base) is not torch.nn.Linear:  # already FP8, or another kind of layer
                continue
            module.base_layer = cls.from_linear(base, device)
            module.base_layer.shares_input = name.rsplit(".", 1)[-1] in SHARED_INPUT_PROJECTIONS
            count += 1
    _keep_out_of_ddp(peft_model, cls)
    return count


def _keep_out_of_ddp(model: torch.nn.Module, cls: type) -> None:
    """DDP broadcasts every parameter from rank 0 when it wraps the model, and every buffer
    before each forward. The FP8 weights are frozen and every rank quantises the same bf16
    weights identically, so there is nothing to synchronise, and gloo cannot even send
    float8 tensors ("Invalid scalar type"). Listed here, DDP leaves them alone."""
    from torch.nn.parallel import DistributedDataParallel

    names = [
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, cls)
        for part in ("weight", "weight_scale", *(("bias",) if module.bias is not None else ()))
    ]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
