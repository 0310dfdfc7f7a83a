"""Predicted peak GPU memory of one LoRA / QLoRA training process, term by term.

Pure arithmetic on a `ModelArch` and a `TrainingShape`: no torch, no I/O. The terms and the
reasoning behind each are in docs/memory-model.md; the constants that are measured rather
than derived live in `MemoryConstants` and are checked by tests/planner/test_planner_calibration.py
against every measured point under tests/data/calibration/.

What is predicted is `torch.cuda.max_memory_reserved()` of the training process (what the
worker reports as peak VRAM). The CUDA context is outside PyTorch's allocator; it is kept as a
separate number and only added when checking a budget (see decide.py).

The peak of a training step is the larger of two moments:
  * the loss: every layer's saved activations (or only the layer inputs, with gradient
    checkpointing) plus the logits / cross-entropy buffers;
  * the backward pass of the last layer: the same saved activations, that layer's
    recomputed activations (with checkpointing) and the gradient buffers of its backward.
On top of both sit the static terms: base weights, adapters, their gradients (kept across
micro-batches when accumulating) and the optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from finetune_api.constants import CUDA_CONTEXT_BYTES

from .arch import ModelArch

KiB, MiB, GiB = 2**10, 2**20, 2**30

Method = Literal["lora", "qlora", "fp8"]

OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
)

# bitsandbytes' paged optimizers page only state tensors of at least this many elements
# (bitsandbytes.optim.optimizer.Optimizer8bit.get_state_buffer); smaller ones are ordinary
# device tensors. Paged state lives in CUDA unified memory, outside PyTorch's allocator.
PAGED_MIN_ELEMENTS = 100_000

NF4_BLOCK = 64  # bitsandbytes 4-bit block size: one absmax per 64 weights
DOUBLE_QUANT_BLOCK = 256  # double quantisation: one fp32 scale per 256 8-bit absmax values


@dataclass(frozen=True)
class MemoryConstants:
    """The measured (not derived) parts of the model. docs/memory-model.md says where each
    number comes from; change them only together with the calibration data.
    `python -m finetune_bench.memory_fit` refits the fitted ones on one side of a held-out
    split of that data and checks them on the other (docs/memory-model.md, "Held-out
    validation"): keep a refit only if it predicts the held-out points at least as well."""

    backward_bytes_per_intermediate: float = 4.0
    """Per token, per intermediate (MLP) channel: bf16 gradient buffers alive while one layer
    runs its backward pass. Fitted on the H200 grid's QLoRA runs (no casts: 4.2)."""
    backward_fp32_cast_bytes_per_intermediate: float = 5.0
    """Added when the adapters' input goes through an fp32 copy (peft's cast to fp32 adapters
    on a bf16 base, or an fp32 residual stream): its gradient comes back in fp32. Fitted on the
    grid's LoRA runs (8.5-9.4 in all) and the reference probe (9.9-10.9 with dropout)."""
    backward_dropout_bytes_per_intermediate: float = 1.0
    """Added with lora_dropout > 0: the gradient through the dropped-out copy."""
    fused_ce_bytes_per_hidden: float = 10.0
    """Per token, per hidden channel: fused linear cross-entropy keeps the gradient of the last
    hidden state (2 bytes) and one chunk of fp32 logits and their gradient (about the size of
    the hidden state, 4 + 4 bytes). Never the full tokens x vocabulary logits."""
    unfused_ce_bytes_per_vocab: float = 18.0
    """Per token, per vocabulary entry, without fusion, at the start of the backward pass: the
    bf16 logits the caller still holds (2), the fp32 log-probabilities kept by the loss (4),
    their gradient (4), the gradient of the fp32 logits (4), its bf16 cast (2) and softmax
    temporaries. The H200 run without liger measured 19.4 on top of the norm/SwiGLU copies."""
    packed_rows_bytes_per_layer: int = 90 * MiB
    """Measured, not understood: with padding-free packed rows (position ids restarting inside
    a row, block-diagonal masks) every layer whose activations are kept holds about 90 MiB
    more than the terms above, whatever the micro-batch (4k, 8k and 16k tokens on the 8B shape:
    +2.8 to +3.0 GiB without checkpointing, +0.5 GiB with it; the L runs of
    docs/perf-notes.md, bench/data/levers-packed-rows-h200.jsonl)."""
    cublas_workspace_bytes: int = 64 * MiB
    """cuBLAS workspaces, allocated through PyTorch's allocator: 32 MiB per handle on Hopper,
    one handle for the forward thread and one for autograd's backward thread (also seen in the
    grid as 64 MiB left in memory_allocated after a previous run in the same process)."""
    allocator_slack_bytes: int = 64 * MiB
    """Reserved minus allocated at the peak: the caching allocator rounds blocks up and cannot
    always reuse freed ones. 0.01-0.61 GiB on the H200 grid, 0.04-0.87 GiB on the reference
    runs; this constant and the fraction below were fitted on both."""
    allocator_slack_fraction: float = 0.02
    """Additional slack proportional to the step's activation memory."""
    compiled_layers_bytes: int = 224 * MiB
    """Compiled decoder layers (plan.compiledLayers), fixed part: Inductor's kernels loaded as
    CUDA modules and its buffers. With the per-token part below, set above every difference
    measured between compiled and eager layers, every layer checkpointed, Llama-3-8B shape:
    +0.13 to +0.46 GiB at 2,048-16,384 tokens per row, LoRA and QLoRA (+0.25 GiB for QLoRA at
    2,048 tokens, the most over the per-token part)
    (bench/data/compiled-layers-h200.jsonl)."""
    compiled_layers_bytes_per_hidden: float = 6.0
    """Compiled decoder layers, per token and hidden channel: what the compiled forward and
    backward of the one layer running at a time hold beyond eager's (Inductor's partitioner
    chooses what to keep, about three bf16 copies of the hidden state per token)."""
    fsdp_gathered_layers: float = 5.0
    """Decoder layers whose full (unsharded) weights one FSDP rank holds at its peak, on top
    of the root unit: 2 if only the running and the next layer were gathered; 5 measured.
    Fitted on 2 ranks (LoRA +0.24 GiB, QLoRA +0.09 GiB over a 2-layer prediction on a
    16-layer, 2048-wide model) and checked on 4 ranks, which the fit never saw (predicted
    1.94 / 1.37 GiB, measured 1.93 / 1.37): bench/fsdp_ranks_on_one_gpu.py, gloo ranks
    sharing one H200 (bench/data/fsdp-ranks-on-one-gpu-*.json). Not yet measured with
    NCCL across GPUs, whose buffers may differ."""
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES
    """Device memory outside PyTorch's allocator: the CUDA context (0.60 GiB right after
    initialisation on an H200 with torch 2.11) plus cuBLAS workspaces and lazily loaded
    kernels (0.75 GiB at the end of every calibration run). nvidia-smi shows it, so budgets
    count it; max_memory_reserved does not."""


DEFAULT_CONSTANTS = MemoryConstants()

WORKER_ADAPTER_BYTES = {"lora": 4, "fp8": 4, "qlora": 2}
"""Bytes per adapter weight in the worker, by method. The worker makes the adapters fp32
(modeling.prepare_for_training), and under QLoRA trl's SFTTrainer casts them to bf16, as the
QLoRA paper does: their gradients and torch AdamW's two moments are then bf16 as well.
Measured in the worker's trainer (bench/data/tensor-bytes-h200.jsonl): the seed's
168M r 64 adapters held 0.31 GiB and their AdamW state 0.63 GiB, against 0.63 and 1.25 GiB
counted at 4 bytes."""
STRATEGIES = ("single", "ddp", "fsdp")


COMPILED_METHODS = ("lora", "qlora")
"""Methods whose decoder layers the worker compiles when every layer is recomputed (measured:
docs/perf-notes.md, "Compiled decoder layers")."""


def compiles_layers(
    method: str,
    gradient_checkpointing: bool,
    checkpointed_layers: int | None,
    fused_kernels: bool,
    strategy: str,
) -> bool:
    """Whether a plan runs compiled decoder layers: where every layer is recomputed (a row's
    host work, each layer's kernels launched three times, is then the bound, and compiling
    takes most of it away), on one process (compiled layers inside DDP and FSDP wrappers are
    not measured), with the fused kernels (a GPU plan)."""
    return (
        method in COMPILED_METHODS
        and gradient_checkpointing
        and checkpointed_layers is None
        and fused_kernels
        and strategy == "single"
    )


@dataclass(frozen=True)
class TrainingShape:
    """One candidate training configuration (what the planner varies and what the user fixed).

    The defaults describe our worker (worker/finetune_worker/modeling.py): bf16 everything
    except fp32 adapters, liger-kernel's fused RMSNorm / SwiGLU / linear cross-entropy,
    torch AdamW. `upcast_non_quantized=True` describes the common recipe's
    prepare_model_for_kbit_training, which keeps embeddings, lm_head and norms in fp32.
    """

    method: Method = "lora"
    lora_r: int = 16
    target_modules: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    use_dora: bool = False
    seq_len: int = 2048
    micro_batch: int = 1
    row_tokens: int | None = None
    """Unpacked varlen rows only: the most real tokens one row holds, when the planner filled
    the budget between two micro-batch sizes (plan.rowTokens); None: micro_batch x seq_len."""
    packing: bool = False
    gradient_checkpointing: bool = False
    checkpointed_layers: int | None = None
    """With gradient_checkpointing: how many decoder layers are recomputed (None: all). The
    others keep their activations; the worker spreads the recomputed ones over the depth."""
    gradient_accumulation: int = 1
    optimizer: str = "adamw_torch"
    fused_ce: bool = True
    fused_kernels: bool = True
    """liger-kernel RMSNorm and SwiGLU (they save bf16 inputs instead of fp32 copies)."""
    double_quant: bool = True
    adapter_bytes: int = 4
    """fp32 adapters (peft's default, and our worker's for LoRA and FP8); 2 when they are cast
    to bf16 (the worker's QLoRA, through trl, and the common recipe's: WORKER_ADAPTER_BYTES)."""
    lean_lora: bool = True
    """The worker's lean LoRA layers (modeling.lean_lora_layers): under autocast the adapters
    read the block's bf16 input directly, without peft's fp32 round trip and its copy."""
    upcast_non_quantized: bool = False
    varlen: bool = True
    """The worker runs each micro-batch, packed or not, as one padding-free row with varlen
    flash attention (finetune_worker.attention; torch >= 2.10): no mask and no per-row
    overhead. False: the older packed rows with block-diagonal masks (some calibration
    records) or a worker on a PyTorch without the kernel."""
    varlen_grouped_kv: bool = True
    """Varlen rows pass the grouped K/V heads to the kernel as they are (torch >= 2.11, the
    worker image's): no repeated K/V kept for backward. Records without the field were
    measured when the worker still repeated them (4.5 GiB on the 8B shape at 12,288 tokens)."""
    attention_mask: bool | None = None
    """Whether attention runs with an explicit mask (padding or packed-sequence boundaries),
    which makes transformers repeat the K/V heads and keep a tokens x tokens boolean mask.
    None: True whenever the batch can hold padding or masked packed rows (our worker), False
    for varlen packed rows."""
    compiled_layers: bool = False
    """The worker compiles the decoder layers (modeling.compile_decoder_layers) and leaves
    liger's kernels out of them: chosen by compiles_layers()."""
    gpu_count: int = 1
    """Training processes in the job (the world size), one per GPU."""
    strategy: str = "single"
    """How the processes share the model: `single` (one process), `ddp` (a whole replica on
    every GPU) or `fsdp` (FULL_SHARD: weights, adapters, gradients and optimizer state
    sharded over all processes)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy is {self.strategy!r}; expected one of {', '.join(STRATEGIES)}"
            )
        if self.strategy != "single" and self.gpu_count < 2:
            raise ValueError(f"strategy {self.strategy!r} needs at least 2 processes")
        if self.method not in ("lora", "qlora", "fp8"):
            raise ValueError(f"method is {self.method!r}; expected 'lora', 'qlora' or 'fp8'")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer is {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.row_tokens is not None and (
            self.packing or not self.varlen or self.row_tokens < self.seq_len
        ):
            raise ValueError(
                f"row_tokens is {self.row_tokens}; it applies to unpacked varlen rows only and "
                f"must hold one whole example (at least seq_len {self.seq_len})"
            )
        for name in ("lora_r", "seq_len", "micro_batch", "gradient_accumulation", "gpu_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)!r}; expected at least 1")

    @property
    def tokens_per_micro_batch(self) -> int:
        """Upper bound: padding-free packing fills a micro-batch with at most this many."""
        return self.row_tokens or self.micro_batch * self.seq_len

    @property
    def masked_attention(self) -> bool:
        if self.attention_mask is not None:
            return self.attention_mask
        return not self.varlen_rows

    @property
    def varlen_rows(self) -> bool:
        """The worker sends every micro-batch as one padding-free varlen row, packed or not
        (unpacked: its whole examples back to back); records without varlen are older runs."""
        return self.varlen

    def recomputed_layers(self, num_layers: int) -> int:
        """Decoder layers whose activations are recomputed in the backward pass."""
        if not self.gradient_checkpointing:
            return 0
        if self.checkpointed_layers is None:
            return num_layers
        return min(self.checkpointed_layers, num_layers)

    def but(self, **changes) -> TrainingShape:
        return replace(self, **changes)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak reserved bytes of one GPU, with the terms that make it up.

    `breakdown` sums to `total`. `cuda_context` is outside `total` (nvidia-smi shows
    total + cuda_context). `paged_optimizer_state` lives in CUDA unified memory, outside both:
    the driver can evict it to host memory, so it does not need to fit.
    """

    total: int
    breakdown: dict[str, int]
    cuda_context: int = 0
    paged_optimizer_state: int = 0
    details: dict[str, float] = field(default_factory=dict)

    @property
    def with_context(self) -> int:
        return self.total + self.cuda_context


class UnknownTargetModule(ValueError):
    """spec.lora.targetModules names a module the architecture does not have."""


def target_projections(
    arch: ModelArch, targets: tuple[str, ...] | list[str]
) -> dict[str, tuple[int, int]]:
    """The projections of one block that get adapters: name -> (in_features, out_features)."""
    projections = arch.projections()
    if any(t in ("all-linear", "all_linear", "all") for t in targets):
        return projections
    chosen: dict[str, tuple[int, int]] = {}
    unknown = []
    for target in targets:
        # peft matches a target as a suffix of the module path ("self_attn.q_proj" or "q_proj").
        name = target.rsplit(".", 1)[-1]
        if name in projections:
            chosen[name] = projections[name]
        elif name in ("qkv_proj", "gate_up_proj") and not arch.fused_projections:
            parts = (
                ("q_proj", "k_proj", "v_proj") if name == "qkv_proj" else ("gate_proj", "up_proj")
            )
            chosen.update({p: projections[p] for p in parts})
        else:
            unknown.append(target)
    if unknown or not chosen:
        raise UnknownTargetModule(
            f"spec.lora.targetModules {list(targets)!r}: {', '.join(unknown) or 'nothing'} "
            f"does not name a linear projection of {arch.name} ({arch.model_type}); expected "
            f"'all-linear' or some of {', '.join(projections)}"
        )
    return chosen


def trainable_params(arch: ModelArch, shape: TrainingShape) -> int:
    """LoRA A (r x in) and B (out x r) for every adapted projection of every block."""
    per_layer = sum(
        shape.lora_r * (fan_in + fan_out) + (fan_out if shape.use_dora else 0)
        for fan_in, fan_out in target_projections(arch, shape.target_modules).values()
    )
    return arch.num_layers * per_layer


def adapter_tensor_sizes(arch: ModelArch, shape: TrainingShape) -> list[int]:
    """Element counts of every trainable tensor (the optimizer allocates state per tensor)."""
    sizes = []
    for fan_in, fan_out in target_projections(arch, shape.target_modules).values():
        sizes += [shape.lora_r * fan_in, fan_out * shape.lora_r]
        if shape.use_dora:
            sizes.append(fan_out)
    return sizes * arch.num_layers


def nf4_bytes(params: int, double_quant: bool) -> int:
    """4-bit weights plus their quantisation constants.

    One absmax per 64-weight block: fp32 (0.5 bit per weight) without double quantisation;
    with it, an 8-bit absmax (0.125 bit) plus one fp32 scale per 256 blocks (0.002 bit).
    """
    blocks = math.ceil(params / NF4_BLOCK)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK)
    else:
        constants = 4 * blocks
    return params // 2 + constants


def fp8_weight_bytes(arch: ModelArch, shape: TrainingShape) -> int:
    """The projections under LoRA adapters in e4m3 (1 byte each) with an fp32 scale per output
    channel; everything else bf16 (finetune_worker.fp8 converts only the adapted projections)."""
    targets = target_projections(arch, shape.target_modules).values()
    fp8_params = arch.num_layers * sum(i * o for i, o in targets)
    scales = 4 * arch.num_layers * sum(o for _, o in targets)
    return fp8_params + scales + 2 * (arch.total_params() - fp8_params)


def weight_bytes(arch: ModelArch, shape: TrainingShape) -> int:
    """The frozen base: bf16 for LoRA; NF4 decoder projections + 16-bit rest for QLoRA; FP8
    adapted projections + bf16 rest for fp8."""
    if shape.method == "lora":
        return 2 * arch.total_params()
    if shape.method == "fp8":
        return fp8_weight_bytes(arch, shape)
    rest = 4 if shape.upcast_non_quantized else 2
    quantized = nf4_bytes(arch.quantizable_params(), shape.double_quant)
    return quantized + rest * arch.unquantized_params()


def optimizer_state_bytes(arch: ModelArch, shape: TrainingShape) -> tuple[int, int]:
    """(bytes in PyTorch's allocator, bytes paged into unified memory) for the adapters."""
    sizes = adapter_tensor_sizes(arch, shape)
    opt = shape.optimizer
    if opt == "sgd":
        return 0, 0
    if opt == "adafactor":
        # Factored second moment (row + column vectors) per matrix, no first moment.
        return sum(4 * (shape.lora_r + n // shape.lora_r) for n in sizes), 0
    per_element = (
        2 if "8bit" in opt else (2 * shape.adapter_bytes if opt.startswith("adamw_torch") else 8)
    )
    if opt.startswith("paged_"):
        resident = sum(per_element * n for n in sizes if n < PAGED_MIN_ELEMENTS)
        paged = sum(per_element * n for n in sizes if n >= PAGED_MIN_ELEMENTS)
        return resident, paged
    return per_element * sum(sizes), 0


def adapter_input_copied(shape: TrainingShape) -> bool:
    """Whether each adapter works on its own copy of its input.

    peft's LoRA layer on a bf16 base casts the input to the adapters' dtype (fp32) and
    autocast casts it back to bf16 for lora_A: a new tensor per adapter. Its 4-bit layer skips
    the cast under autocast, and so do the worker's lean LoRA layers, so bf16 inputs are used
    as they are; an fp32 residual stream (the common recipe's upcast) is cast to bf16 by
    autocast, again a copy.
    """
    act = residual_bytes(shape)
    if act != 2:
        return True
    return shape.method != "qlora" and shape.adapter_bytes != act and not shape.lean_lora


def residual_bytes(shape: TrainingShape) -> int:
    """Bytes per element of the residual stream: bf16, except under the common recipe's
    QLoRA, whose fp32 embeddings and norms turn every hidden state into fp32."""
    return 4 if (shape.method == "qlora" and shape.upcast_non_quantized) else 2


def layer_activation_bytes(arch: ModelArch, shape: TrainingShape) -> dict[str, float]:
    """Bytes one decoder layer keeps for its backward pass, per token, by where they come from.

    Frozen base projections keep nothing (their weight gradient is not needed); what is kept:
      norms      - RMSNorm input: an fp32 copy (stock) or the 16-bit input (liger);
      adapters   - per adapted projection, the input lora_A saves: its own bf16 copy when the
                   input is cast (see adapter_input_copied), the dropped-out copy plus a
                   1-byte mask with dropout, otherwise the block's tensor itself (shared);
      attention  - SDPA's query, key, value and output (bf16) and its fp32 log-sum-exp; with
                   an explicit mask transformers repeats K/V to every query head first;
      mlp        - gate and up outputs (and SiLU's output without liger's fused SwiGLU).
    """
    h, i = arch.hidden_size, arch.intermediate_size
    act = residual_bytes(shape)
    norm_bytes = (act if shape.fused_kernels else 4) * h
    norms = arch.norms_per_layer * norm_bytes

    targets = target_projections(arch, shape.target_modules)
    mask = 1 if shape.lora_dropout > 0 else 0
    shares_input = mask == 0 and not adapter_input_copied(shape)
    adapters = 0.0
    # Without a copy, lora_A saves the very tensor the block already has: once per distinct
    # input (q/k/v share one, gate/up another), and o_proj's input is SDPA's saved output.
    seen_inputs: set[str] = {"attention_output"}
    groups = {
        "q_proj": "attention_input",
        "k_proj": "attention_input",
        "v_proj": "attention_input",
        "qkv_proj": "attention_input",
        "gate_proj": "mlp_input",
        "up_proj": "mlp_input",
        "gate_up_proj": "mlp_input",
        "o_proj": "attention_output",
    }
    for name, (fan_in, _fan_out) in targets.items():
        adapters += 2 * shape.lora_r  # lora_A's output, saved by lora_B
        group = groups.get(name, name)
        if shares_input:
            if group in seen_inputs:
                continue
            seen_inputs.add(group)
        adapters += (2 + mask) * fan_in

    # K/V heads are repeated to the query heads (and the copies saved for backward) under a
    # mask; varlen rows keep them grouped where the kernel takes them so (torch >= 2.11),
    # older varlen rows repeated them (measured on the H200: 4.5 GiB at 12,288 tokens, 8B).
    repeated = shape.masked_attention or (shape.varlen_rows and not shape.varlen_grouped_kv)
    kv_width = arch.q_dim if repeated else arch.kv_dim
    attention = 2 * arch.q_dim + 2 * 2 * kv_width + 2 * arch.q_dim + 4 * arch.num_heads

    mlp = (2 if shape.fused_kernels else 3) * act * i
    return {"norms": norms, "adapters": adapters, "attention": attention, "mlp": mlp}


def fsdp_shards(
    arch: ModelArch,
    shape: TrainingShape,
    weights: float,
    adapters: float,
    gradients: float,
    optimizer: float,
    paged: float,
    constants: MemoryConstants = DEFAULT_CONSTANTS,
):
    """Per-process bytes under FULL_SHARD FSDP: every persistent term divided by the world
    size, plus what is all-gathered while it is used.

    Gathered: the root unit (embeddings, final norm, lm_head), which FSDP keeps unsharded
    through the forward and backward passes, and the decoder layers gathered at the peak (the
    one computing and those FSDP still holds or prefetched: `constants.fsdp_gathered_layers`).
    4-bit QLoRA weights shard the same way once they are stored in the compute dtype
    (`bnb_4bit_quant_storage`), so their packed size is what moves."""
    world = shape.gpu_count
    root = 2 * (arch.embedding_params() + arch.lm_head_params())
    layer = max(0.0, (weights - root) / arch.num_layers)
    gathered = root + constants.fsdp_gathered_layers * layer
    return (
        weights / world,
        adapters / world,
        gradients / world,
        optimizer / world,
        paged / world,
        gathered,
    )


def estimate_memory(
    arch: ModelArch, shape: TrainingShape, constants: MemoryConstants = DEFAULT_CONSTANTS
) -> MemoryEstimate:
    """Predict the peak reserved GPU memory of one training process (one GPU)."""
    tokens = shape.tokens_per_micro_batch
    h, i, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    act = residual_bytes(shape)

    n_trainable = trainable_params(arch, shape)
    weights = weight_bytes(arch, shape)
    adapters = shape.adapter_bytes * n_trainable
    # Gradients are kept across micro-batches when accumulating; without accumulation they
    # appear while activations are freed, so they still overlap the end of the backward pass.
    gradients = shape.adapter_bytes * n_trainable
    optimizer, paged = optimizer_state_bytes(arch, shape)
    # DDP keeps a flat copy of the gradients in its all-reduce buckets.
    ddp_buckets = gradients if shape.strategy == "ddp" else 0
    gathered = 0
    if shape.strategy == "fsdp":
        weights, adapters, gradients, optimizer, paged, gathered = fsdp_shards(
            arch, shape, weights, adapters, gradients, optimizer, paged, constants
        )

    per_layer = layer_activation_bytes(arch, shape)
    layer_bytes = sum(per_layer.values())
    # A recomputed layer keeps only its input through the forward pass and rebuilds the rest
    # when its backward comes; the others keep everything. One layer is rebuilt at a time, on
    # top of everything saved only when every layer is recomputed: with some, the worker never
    # recomputes the last layer (it spreads them from the first), so the last layer's saved
    # activations, as large as a rebuilt layer's, are freed before the first rebuild
    # (measured on the H200: bench/data/partial-checkpointing-h200.jsonl).
    rebuilt = shape.recomputed_layers(layers)
    saved = (rebuilt * act * h + (layers - rebuilt) * layer_bytes) * tokens
    recomputed = layer_bytes * tokens if rebuilt == layers else 0.0
    # The worker packs examples into rows of seq_len tokens (or pads them to it): at most
    # micro_batch rows, each with a seq_len x seq_len boolean mask shared by all layers.
    attention_mask = (
        shape.micro_batch * shape.seq_len * shape.seq_len if shape.masked_attention else 0
    )
    if shape.packing and not shape.varlen:
        attention_mask += constants.packed_rows_bytes_per_layer * (
            1 if shape.gradient_checkpointing else layers
        )
    backward_per_channel = (
        constants.backward_bytes_per_intermediate
        + (
            constants.backward_fp32_cast_bytes_per_intermediate
            if adapter_input_copied(shape)
            else 0.0
        )
        + (constants.backward_dropout_bytes_per_intermediate if shape.lora_dropout > 0 else 0.0)
    )
    backward = backward_per_channel * i * tokens
    if shape.method == "qlora":
        # bitsandbytes dequantises one projection at a time into a bf16 scratch matrix.
        backward += 2 * max(a * b for a, b in arch.projections().values())
    if shape.method == "fp8":
        # The input gradient of one projection at a time: its FP8 weight transposed (1 byte
        # per weight) and the gradient quantised to e4m3 (1 byte per token and channel).
        widest = max(arch.projections().values(), key=lambda p: p[0] * p[1])
        backward += (
            widest[0] * widest[1] + max(max(p) for p in arch.projections().values()) * tokens
        )

    if shape.fused_ce:
        loss = constants.fused_ce_bytes_per_hidden * h * tokens
    else:
        loss = constants.unfused_ce_bytes_per_vocab * arch.vocab_size * tokens
    if shape.method == "qlora" and shape.upcast_non_quantized:
        # autocast casts the fp32 lm_head to bf16 on every call (frozen weights are not cached).
        loss += 2 * arch.vocab_size * h
    final_hidden = (4 + act) * h * tokens  # final norm's saved input and its output

    at_loss = saved + final_hidden + loss
    at_backward = saved + recomputed + backward
    if at_loss >= at_backward:
        activations, logits, transient = saved + final_hidden, loss, 0.0
    else:
        activations, logits, transient = saved + recomputed, 0.0, backward
    dynamic = activations + logits + transient + attention_mask
    compiled = (
        constants.compiled_layers_bytes + constants.compiled_layers_bytes_per_hidden * h * tokens
        if shape.compiled_layers
        else 0.0
    )
    slack = constants.allocator_slack_bytes + constants.allocator_slack_fraction * dynamic

    breakdown = {
        "weights": int(weights + gathered),
        "adapter_weights": int(adapters),
        "gradients": int(gradients + ddp_buckets),
        "optimizer_state": int(optimizer),
        "activations": int(activations + attention_mask),
        "logits": int(logits),
        "backward_buffers": int(transient),
        "workspace": int(constants.cublas_workspace_bytes + compiled),
        "allocator_overhead": int(slack),
    }
    details = {
        "trainable_params": n_trainable,
        "total_params": arch.total_params(),
        "tokens_per_micro_batch": tokens,
        "layer_bytes_per_token": layer_bytes,
        "fsdp_gathered_bytes": gathered,
        **{f"layer_{k}_bytes_per_token": v for k, v in per_layer.items()},
    }
    return MemoryEstimate(
        total=sum(breakdown.values()),
        breakdown=breakdown,
        cuda_context=constants.cuda_context_bytes,
        paged_optimizer_state=int(paged),
        details=details,
    )
