"""Choosing method, micro-batch and gradient checkpointing for a GPU memory budget.

Every configuration the user left open is enumerated (LoRA / QLoRA / FP8 base x
checkpointing of none, every eighth, or all of the layers x every micro-batch: packed, those
that divide the per-GPU batch; unpacked, any up to it), its peak is predicted by memory.py,
and the fastest one that fits is chosen. Pure: no I/O, no pydantic; api_adapter.py turns the
decision into the FineTuneJob's status.plan.

Methods: `method: auto` tries those `allowedMethods` allows (all three when unset), but fp8
only where the job's GPU is known to have FP8 tensor cores (gpus.py): `resources.gpu.product`
when the spec names one, else every GPU node that could take the job (`Budget.gpu_nodes`,
which the operator reads from the nodes' GPU Feature Discovery labels); on other GPUs the
worker refuses fp8 at start. A product known to lack them refuses a named `method: fp8` at
planning time instead.

Fitting: `resources.gpu.memory` is what nvidia-smi would show, so the CUDA context is added to
the predicted peak, and a safety margin (5 % of the budget or 0.5 GiB, whichever is larger)
is kept free for what the model cannot see: fragmentation after hours of uneven batches,
NCCL buffers, a second CUDA stream.

Speed: the predicted tokens/s of speed.py, a GPU-time / host-time model fitted on the
worker's own training step on an H200 over micro-batch tokens x checkpointing x method x
model size (held-out points within about 12 %). Small micro-batches are host-bound (Python
launches the same kernels whatever their size), much more so for small models, so a large
micro-batch with checkpointing often beats a small one without (Llama-3-8B at 40 GiB, seq
1024: 8,192 tokens with checkpointing 10,700 tokens/s, 2,048 without 8,094; Llama-3.2-1B:
16,384 with checkpointing 53,596, 2,048 without 18,928). Micro-batches stop at 16,384 tokens:
beyond that the extra speed is a few percent and the memory is better left as headroom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from finetune_api.constants import FP8_MIN_COMPUTE_CAPABILITY, ROW_PAD_MULTIPLE

from .arch import ModelArch
from .gpus import NodeFp8, compute_capability, format_capability, has_fp8
from .memory import (
    DEFAULT_CONSTANTS,
    WORKER_ADAPTER_BYTES,
    GiB,
    MemoryConstants,
    MemoryEstimate,
    MiB,
    TrainingShape,
    compiles_layers,
    estimate_memory,
)
from .speed import predicted_tokens_per_second

MethodChoice = Literal["auto", "lora", "qlora", "fp8"]
METHODS = ("lora", "qlora", "fp8")
"""What `method: auto` may resolve to, in the order ties are broken."""

DEFAULT_MAX_TOKENS_PER_MICRO_BATCH = 16384
# Relative speed of the strategies for the same per-process shape. FULL_SHARD FSDP all-gathers
# every layer's weights in the forward and again in the backward pass and reduce-scatters the
# gradients; on NVLink most of it overlaps compute. A prediction until multi-GPU measurements
# exist; it only has to rank DDP above FSDP whenever DDP fits.
STRATEGY_SPEED = {"single": 1.0, "ddp": 1.0, "fsdp": 0.85}
STRATEGY_NAMES = {
    "single": "one process",
    "ddp": "data-parallel (DDP)",
    "fsdp": "fully sharded (FSDP FULL_SHARD)",
}
# QLoRA must be predicted this much faster to be chosen over LoRA: its NF4 base costs some
# quality, and the speed model's held-out error is of the same order (about 10 %).
QLORA_MIN_SPEEDUP = 1.10
BASE_NAMES = {"lora": "bf16 base", "qlora": "4-bit NF4 base", "fp8": "FP8 e4m3 base"}
SAFETY_FRACTION = 0.05
SAFETY_MIN_BYTES = 512 * MiB


def format_gib(n: float) -> str:
    """Bytes as GiB with one decimal, the way a FineTuneJob's budget is written (`23.4Gi`)."""
    return f"{n / GiB:.1f}Gi"


class MethodNotSupported(ValueError):
    """The spec leaves the planner no method the job's GPU can run: it names fp8 (or allows
    only fp8) where the GPU product lacks FP8 tensor cores or is not known to have them."""


@dataclass(frozen=True)
class Budget:
    """The GPUs the plan must fit in: memory per GPU (`spec.resources.gpu.memory`), how many,
    and which product when the spec names it."""

    gpu_memory_bytes: int
    gpu_count: int = 1
    """GPUs per worker pod."""
    nodes: int = 1
    """Worker pods, each with `gpu_count` GPUs."""
    safety_fraction: float = SAFETY_FRACTION
    safety_min_bytes: int = SAFETY_MIN_BYTES
    gpu_product: str | None = None
    """The `nvidia.com/gpu.product` label the pods are pinned to; None: any GPU."""
    gpu_nodes: NodeFp8 | None = None
    """Without a product: whether every GPU node that could take the job has FP8 tensor cores
    (gpus.fp8_on_nodes). None: not looked at (the planner CLI), which counts as not known."""

    @property
    def world_size(self) -> int:
        """Training processes: one per GPU over all pods."""
        return self.gpu_count * self.nodes

    @property
    def margin_bytes(self) -> int:
        return int(max(self.safety_fraction * self.gpu_memory_bytes, self.safety_min_bytes))

    @property
    def usable_bytes(self) -> int:
        return self.gpu_memory_bytes - self.margin_bytes

    def required_for(self, need_bytes: int) -> int:
        """The smallest budget whose usable part holds `need_bytes` (rounded up to 0.1 GiB)."""
        exact = max(need_bytes / (1 - self.safety_fraction), need_bytes + self.safety_min_bytes)
        step = GiB / 10
        return int(math.ceil(exact / step) * step)


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; None means "the planner decides"."""

    method: MethodChoice = "auto"
    allowed_methods: tuple[str, ...] = METHODS
    """What `auto` may choose from (`spec.allowedMethods`); only auto may restrict it."""
    lora_r: int = 16
    target_modules: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    use_dora: bool = False
    seq_len: int = 2048
    packing: bool = False
    batch_size: int = 16
    """Effective batch: micro-batch x gradient accumulation x GPUs."""
    micro_batch: int | None = None
    gradient_checkpointing: bool | None = None
    optimizer: str = "adamw_torch"
    double_quant: bool = True
    fused_ce: bool = True
    fused_kernels: bool = True
    compile_layers: bool = True
    """Whether plans may compile their decoder layers (memory.compiles_layers decides where);
    spec.training.compileLayers `off` forbids it."""
    max_tokens_per_micro_batch: int = DEFAULT_MAX_TOKENS_PER_MICRO_BATCH

    def __post_init__(self) -> None:
        if self.method not in ("auto", *METHODS):
            raise ValueError(f"spec.method is {self.method!r}; expected auto, lora, qlora or fp8")
        if not self.allowed_methods or not set(self.allowed_methods) <= set(METHODS):
            raise ValueError(
                f"spec.allowedMethods is {list(self.allowed_methods)}; expected some of "
                "lora, qlora and fp8"
            )
        if self.method != "auto" and set(self.allowed_methods) != set(METHODS):
            raise ValueError(
                f"spec.allowedMethods restricts method auto only; spec.method is {self.method!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"spec.training.batchSize is {self.batch_size}; expected >= 1")


@dataclass(frozen=True)
class Candidate:
    shape: TrainingShape
    estimate: MemoryEstimate
    gradient_accumulation: int
    """Micro-batches per optimizer step and process; without packing the most a step can
    need (rows of whole examples, each example at most seq_len)."""
    fits: bool
    speed: float
    step_examples: int | None = None
    """Without packing: whole examples per optimizer step and process, split into rows of at
    most micro_batch x seq_len tokens by the worker. None with packing (a step is
    micro_batch x gradient_accumulation rows of packed tokens)."""

    @property
    def effective_batch(self) -> int:
        per_process = self.step_examples or self.shape.micro_batch * self.gradient_accumulation
        return per_process * self.shape.gpu_count

    @property
    def strategy(self) -> str:
        return self.shape.strategy

    @property
    def need_bytes(self) -> int:
        """Predicted peak as nvidia-smi would show it: reserved + CUDA context."""
        return self.estimate.with_context

    def describe(self) -> str:
        shape = self.shape
        base = BASE_NAMES[shape.method]
        if not shape.gradient_checkpointing:
            ckpt = "without gradient checkpointing"
        elif shape.checkpointed_layers is None:
            ckpt = "with gradient checkpointing"
        else:
            ckpt = f"with gradient checkpointing of {shape.checkpointed_layers} layers"
        if shape.compiled_layers:
            ckpt += " and compiled decoder layers"
        if self.step_examples is None:
            batching = (
                f"micro-batch {shape.micro_batch} x {self.gradient_accumulation} accumulation "
                f"step{'s' if self.gradient_accumulation != 1 else ''}"
            )
        else:
            batching = (
                f"{self.step_examples} examples per step in rows of up to "
                f"{shape.tokens_per_micro_batch} tokens (micro-batch {shape.micro_batch})"
            )
        text = f"{shape.method} ({base}) {ckpt}, {batching}"
        if self.shape.strategy != "single":
            text += f" x {self.shape.gpu_count} processes, {STRATEGY_NAMES[self.shape.strategy]}"
        return text


@dataclass(frozen=True)
class PlanDecision:
    """The planner's answer. `chosen` is None when nothing fits; `minimum_budget_bytes` then
    says how much memory per GPU the cheapest allowed configuration would need."""

    fits: bool
    chosen: Candidate | None
    candidates: list[Candidate]
    reason: str
    budget: Budget
    request: PlanRequest
    arch: ModelArch
    minimum_budget_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return self.chosen.shape.method if self.chosen else None

    @property
    def micro_batch(self) -> int | None:
        return self.chosen.shape.micro_batch if self.chosen else None

    @property
    def gradient_accumulation(self) -> int | None:
        return self.chosen.gradient_accumulation if self.chosen else None

    @property
    def gradient_checkpointing(self) -> bool | None:
        return self.chosen.shape.gradient_checkpointing if self.chosen else None

    @property
    def estimate(self) -> MemoryEstimate | None:
        return self.chosen.estimate if self.chosen else None


def speed_score(arch: ModelArch, shape: TrainingShape) -> float:
    """Predicted tokens per second of the whole job (speed.py, times the processes and the
    strategy's factor)."""
    return (
        predicted_tokens_per_second(arch, shape) * shape.gpu_count * STRATEGY_SPEED[shape.strategy]
    )


def _divisors(n: int) -> list[int]:
    return sorted({d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)})


def micro_batch_options(request: PlanRequest, gpu_count: int) -> list[int]:
    """Micro-batches to try, up to the token cap; at least 1.

    Packed: divisors of the per-GPU batch, so that accumulation makes the effective batch
    exact. Unpacked: the divisors and a ladder of steps of at most 1.5x (1, 2, 3, 4, 6, 8, 12,
    ...) up to the per-GPU batch, because a step is always its whole examples (the worker
    splits them into rows of the micro-batch's token budget), so the budget need not divide
    anything; the ladder keeps the candidates few (planning runs in the operator's event loop)
    while checkpointing in eighths fills what lies between its rungs."""
    if request.micro_batch is not None:
        return [request.micro_batch]
    per_gpu = step_examples(request, gpu_count)
    cap = max(1, request.max_tokens_per_micro_batch // request.seq_len)
    sizes = set(_divisors(per_gpu))
    if not request.packing:
        rung = 1
        while rung < per_gpu:
            sizes |= {rung, rung * 3 // 2} if rung > 1 else {1}
            rung *= 2
    return sorted(m for m in sizes if m <= min(cap, per_gpu)) or [1]


def step_examples(request: PlanRequest, gpu_count: int) -> int:
    """Examples (packed: rows) per optimizer step and process."""
    return max(1, math.ceil(request.batch_size / gpu_count))


def checkpoint_options(request: PlanRequest, num_layers: int) -> list[tuple[bool, int | None]]:
    """(checkpointing, recomputed layers or None for all) to try.

    `auto` tries none, all, and every eighth of the layers in between: recomputing some
    layers costs a share of the recompute and saves a share of the activations, so a budget
    between the two extremes is filled instead of wasted. `on` means every layer."""
    if request.gradient_checkpointing is False:
        return [(False, None)]
    if request.gradient_checkpointing is True:
        return [(True, None)]
    partial = sorted({round(num_layers * j / 8) for j in range(1, 8)} - {0, num_layers})
    return [(False, None), *((True, k) for k in partial), (True, None)]


def _shape(
    request: PlanRequest,
    method: str,
    ckpt: bool,
    micro: int,
    accum: int,
    gpu_count: int,
    strategy: str = "single",
    recomputed: int | None = None,
) -> TrainingShape:
    return TrainingShape(
        method=method,
        lora_r=request.lora_r,
        target_modules=request.target_modules,
        lora_dropout=request.lora_dropout,
        use_dora=request.use_dora,
        seq_len=request.seq_len,
        micro_batch=micro,
        packing=request.packing,
        gradient_checkpointing=ckpt,
        checkpointed_layers=recomputed if ckpt else None,
        gradient_accumulation=accum,
        optimizer=request.optimizer,
        fused_ce=request.fused_ce,
        fused_kernels=request.fused_kernels,
        double_quant=request.double_quant,
        adapter_bytes=WORKER_ADAPTER_BYTES[method],
        compiled_layers=request.compile_layers
        and compiles_layers(
            method, ckpt, recomputed if ckpt else None, request.fused_kernels, strategy
        ),
        gpu_count=gpu_count,
        strategy=strategy,
    )


def _fp8_missing(product: str | None, nodes: NodeFp8 | None = None) -> str | None:
    """Why the job's GPU is not known to have FP8 tensor cores, or None when it has them: by
    the product when one is named, else by the GPU nodes that could take the job."""
    capability = compute_capability(product)
    if not product and nodes is not None:
        if nodes.fp8:
            return None
        return (
            f"{nodes.detail}; name a GPU with FP8 tensor cores (compute capability "
            f"{format_capability(FP8_MIN_COMPUTE_CAPABILITY)} or newer) in "
            "spec.resources.gpu.product, or select only such nodes with "
            "spec.resources.nodeSelector"
        )
    if capability is None and not product:
        return (
            "set spec.resources.gpu.product to a GPU with FP8 tensor cores (compute "
            f"capability {format_capability(FP8_MIN_COMPUTE_CAPABILITY)} or newer)"
        )
    if capability is None:
        return (
            f"spec.resources.gpu.product {product!r} is not a GPU the planner knows to have "
            "FP8 tensor cores"
        )
    if capability < FP8_MIN_COMPUTE_CAPABILITY:
        return (
            f"spec.resources.gpu.product {product!r} (compute capability "
            f"{format_capability(capability)}) has no FP8 tensor cores"
        )
    return None


def methods_to_consider(request: PlanRequest, budget: Budget) -> tuple[list[str], str | None]:
    """The methods to enumerate, and a note when `auto` leaves fp8 out for want of a GPU
    known to have FP8 tensor cores, or considers it because of the cluster's nodes (the plan
    then depends on them, not on the spec alone). MethodNotSupported when no method is left."""
    missing = _fp8_missing(budget.gpu_product, budget.gpu_nodes)
    if request.method != "auto":
        # An unknown product may still have FP8: the worker checks the real GPU at start.
        if request.method == "fp8" and has_fp8(budget.gpu_product) is False:
            raise MethodNotSupported(
                f"spec.method is fp8, but {missing} (FP8 needs compute capability "
                f"{format_capability(FP8_MIN_COMPUTE_CAPABILITY)} or newer); choose method auto, "
                "lora or qlora, or a GPU product with FP8 tensor cores"
            )
        return [request.method], None
    methods = [m for m in METHODS if m in request.allowed_methods]
    if "fp8" not in methods:
        return methods, None
    if missing is None:
        if budget.gpu_product or budget.gpu_nodes is None:
            return methods, None
        # Only the cluster's nodes let fp8 in: the same spec may plan otherwise elsewhere.
        return methods, (
            f"fp8 considered: {budget.gpu_nodes.detail}; the pods of an fp8 plan require "
            f"compute capability {format_capability(FP8_MIN_COMPUTE_CAPABILITY)} or newer."
        )
    if methods == ["fp8"]:
        raise MethodNotSupported(
            f"spec.allowedMethods allows only fp8, but fp8 cannot be planned: {missing}; "
            "or allow lora or qlora too"
        )
    return [m for m in methods if m != "fp8"], f"fp8 not considered: {missing}."


def enumerate_candidates(
    arch: ModelArch,
    request: PlanRequest,
    budget: Budget,
    methods: list[str],
    constants: MemoryConstants = DEFAULT_CONSTANTS,
) -> list[Candidate]:
    world = budget.world_size
    strategies = ["single"] if world == 1 else ["ddp", "fsdp"]
    per_process = step_examples(request, world)

    def candidate(shape: TrainingShape, accum: int) -> Candidate:
        estimate = estimate_memory(arch, shape, constants)
        return Candidate(
            shape=shape,
            estimate=estimate,
            gradient_accumulation=accum,
            fits=estimate.with_context <= budget.usable_bytes,
            speed=speed_score(arch, shape),
            step_examples=None if request.packing else per_process,
        )

    candidates = []
    for strategy in strategies:
        for method in methods:
            if method == "fp8" and strategy == "fsdp":
                continue  # FP8 layers are not sharded
            for ckpt, recomputed in checkpoint_options(request, arch.num_layers):
                ladder = []
                for micro in micro_batch_options(request, world):
                    accum = max(1, math.ceil(per_process / micro))
                    shape = _shape(request, method, ckpt, micro, accum, world, strategy, recomputed)
                    ladder.append(candidate(shape, accum))
                candidates += ladder
                filled = _filled_row(request, ladder, per_process, candidate)
                if filled is not None:
                    candidates.append(filled)
    return candidates


def _filled_row(
    request: PlanRequest,
    ladder: list[Candidate],
    per_process: int,
    candidate: Callable[[TrainingShape, int], Candidate],
) -> Candidate | None:
    """Unpacked steps: the largest row budget that fits between the ladder's largest fitting
    micro-batch and its smallest one that does not, or None.

    An unpacked step is its whole examples split into rows of the budget (the worker bin-packs
    them), so the budget need not be a whole number of seqLength examples: a 12 GiB QLoRA job
    whose budget holds 8 x 512 tokens but not 12 x 512 gets rows of about 5,000, and a typical
    16-example step (about 4,600 tokens of instruction data) runs as one row instead of two.
    The bound stays the worst case: any step's rows hold at most that many real tokens. Peak
    memory grows with the row's tokens, so the largest fitting budget is found by bisection."""
    if request.packing or request.micro_batch is not None or not ladder:
        return None
    seq = request.seq_len
    fitting = [c for c in ladder if c.fits]
    if not fitting or not fitting[0].shape.varlen_rows:
        return None
    low = max(c.shape.tokens_per_micro_batch for c in fitting)
    over = [c.shape.tokens_per_micro_batch for c in ladder if not c.fits]
    high = min([*over, request.max_tokens_per_micro_batch + 1, per_process * seq + 1])
    # row budgets lo*step .. hi*step, each a multiple of the worker's row padding
    step = ROW_PAD_MULTIPLE
    lo, hi = low // step + 1, (high - 1) // step
    base, best = fitting[0].shape, None
    while lo <= hi:
        mid = (lo + hi) // 2
        tokens = mid * step
        micro = max(1, tokens // seq)
        accum = max(1, math.ceil(per_process / micro))
        found = candidate(
            base.but(micro_batch=micro, row_tokens=tokens, gradient_accumulation=accum), accum
        )
        if found.fits:
            best, lo = found, mid + 1
        else:
            hi = mid - 1
    return best


def plan_training(
    arch: ModelArch,
    request: PlanRequest,
    budget: Budget,
    constants: MemoryConstants = DEFAULT_CONSTANTS,
) -> PlanDecision:
    """Choose the fastest configuration that fits (see the module docstring for "fastest").
    MethodNotSupported when the spec leaves no method the GPU product can run."""
    methods, fp8_note = methods_to_consider(request, budget)
    candidates = enumerate_candidates(arch, request, budget, methods, constants)
    fitting = [c for c in candidates if c.fits]
    cheapest = min(candidates, key=lambda c: c.need_bytes)
    minimum = budget.required_for(cheapest.need_bytes)
    notes: list[str] = [fp8_note] if fp8_note else []
    if not fitting:
        reason = (
            f"Nothing fits in {format_gib(budget.gpu_memory_bytes)} per GPU: the smallest "
            f"configuration allowed by the spec ({cheapest.describe()}, seq {request.seq_len}) "
            f"needs {format_gib(cheapest.need_bytes)} including the CUDA context, so "
            f"spec.resources.gpu.memory must be at least {format_gib(minimum)} (it keeps "
            f"{format_gib(budget.required_for(cheapest.need_bytes) - cheapest.need_bytes)} "
            "free as a safety margin)." + _unlock_hint(request)
        )
        reason = " ".join([reason, *notes])
        return PlanDecision(False, None, candidates, reason, budget, request, arch, minimum, notes)
    chosen = max(fitting, key=_preference)
    notes = _notes(chosen, candidates, budget) + notes
    reason = _reason(chosen, candidates, budget, request, notes)
    return PlanDecision(True, chosen, candidates, reason, budget, request, arch, minimum, notes)


def _preference(c: Candidate) -> tuple[float, int]:
    """Fastest first, LoRA over QLoRA unless clearly slower, then the least memory. FP8 is
    ranked on its predicted speed alone."""
    return (c.speed / (QLORA_MIN_SPEEDUP if c.shape.method == "qlora" else 1.0), -c.need_bytes)


def _unlock_hint(request: PlanRequest) -> str:
    hints = []
    if request.method in ("lora", "fp8"):
        hints.append("method qlora")
    elif "qlora" not in request.allowed_methods:
        hints.append("qlora in spec.allowedMethods")
    if request.gradient_checkpointing is False:
        hints.append("gradientCheckpointing on")
    if request.micro_batch not in (None, 1):
        hints.append("microBatchSize auto")
    if hints:
        return " Allowing " + " or ".join(hints) + " would need less."
    return " A shorter seqLength or a smaller LoRA r would need less."


def _notes(chosen: Candidate, candidates: list[Candidate], budget: Budget) -> list[str]:
    """What the strategy means for this job, and why it was chosen over the other."""
    world, strategy = budget.world_size, chosen.strategy
    if strategy == "single":
        return []
    where = (
        f"{budget.nodes} nodes x {budget.gpu_count} GPUs"
        if budget.nodes > 1
        else f"{budget.gpu_count} GPUs"
    )
    if strategy == "ddp":
        return [
            (
                f"{world} processes ({where}) run data-parallel (DDP): each holds the whole "
                "model and the gradients are averaged, so the budget applies per GPU."
            )
        ]
    ddp_fits = any(c.fits for c in candidates if c.strategy == "ddp")
    why = (
        "it is the faster fitting configuration"
        if ddp_fits
        else "no data-parallel configuration fits: a whole replica needs at least "
        + format_gib(min(c.need_bytes for c in candidates if c.strategy == "ddp"))
        + " per GPU"
    )
    return [
        (
            f"{world} processes ({where}) run fully sharded (FSDP FULL_SHARD) because {why}: "
            "the frozen base, adapters, gradients and optimizer state are split over all "
            "processes and each layer is gathered while it runs. The FSDP memory terms are "
            "calibrated on ranks sharing one GPU, not yet measured across GPUs."
        )
    ]


def _reason(
    chosen: Candidate,
    candidates: list[Candidate],
    budget: Budget,
    request: PlanRequest,
    notes: list[str],
) -> str:
    shape = chosen.shape
    parts = [
        (
            f"{chosen.describe()}: predicted peak {format_gib(chosen.estimate.total)} + "
            f"{format_gib(chosen.estimate.cuda_context)} CUDA context = "
            f"{format_gib(chosen.need_bytes)} of {format_gib(budget.gpu_memory_bytes)} per GPU "
            f"({format_gib(budget.usable_bytes)} usable after a "
            f"{format_gib(budget.margin_bytes)} safety margin)."
        )
    ]
    fitting = [c for c in candidates if c.fits]
    if len(candidates) == 1:
        parts.append("The only configuration the spec allows; it fits.")
    else:
        # Unpacked rows are ranked as if full; a step of short examples fills less of one, so
        # the figure is what full rows would reach (measured: the seed's QLoRA job, rows of
        # 6,720 tokens predicted 9,842 tokens/s, steps of ~4,300 tokens ran 6,436-7,634).
        full_rows = "" if chosen.shape.packing else " with full rows"
        parts.append(
            f"Fastest of {len(fitting)} fitting configurations out of "
            f"{len(candidates)} (predicted {chosen.speed:,.0f} tokens/s on an H200{full_rows})."
        )
    # Say what a faster option would have cost, so the user knows what more memory buys.
    faster = [c for c in candidates if not c.fits and c.speed > chosen.speed]
    if faster:
        nearest = min(faster, key=lambda c: c.need_bytes)
        parts.append(
            f"Faster but not fitting: {nearest.describe()} would need "
            f"{format_gib(budget.required_for(nearest.need_bytes))}."
        )
    if (
        shape.micro_batch < request.batch_size // budget.world_size
        and request.micro_batch is None
        and shape.tokens_per_micro_batch * 2 > request.max_tokens_per_micro_batch
    ):
        parts.append(
            f"Micro-batch capped at about {request.max_tokens_per_micro_batch} tokens: "
            "larger ones gain little speed."
        )
    if chosen.effective_batch != request.batch_size:
        per_process = (
            f"{shape.micro_batch} x {chosen.gradient_accumulation}"
            if chosen.step_examples is None
            else str(chosen.step_examples)
        )
        parts.append(
            f"Effective batch rounded from {request.batch_size} to "
            f"{chosen.effective_batch} ({per_process} x {budget.world_size} GPU"
            f"{'s' if budget.world_size != 1 else ''})."
        )
    return " ".join(parts + notes)
