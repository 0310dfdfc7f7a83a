"""FineTuneJob spec in, `status.plan` out: the thin layer between the API models and the core.

The core (arch, memory, decide) knows nothing about pydantic; this module reads a
`FineTuneJobSpec` into a `PlanRequest` and a `Budget`, and writes the decision as the API's
`TrainingPlan`. When nothing fits it raises `NoFittingPlan`, and when the GPU product cannot
run the method the spec leaves `MethodNotSupported`; both messages are meant for the
FineTuneJob's Planned=False condition.

The operator also passes what the cluster's GPU nodes say about FP8 (`gpu_nodes_for_spec`),
read only for the specs where they can change the plan (`needs_gpu_nodes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .arch import ModelArch
from .decide import METHODS, Budget, PlanDecision, PlanRequest, plan_training
from .gpus import NodeFp8, fp8_on_nodes
from .memory import DEFAULT_CONSTANTS, MemoryConstants

if TYPE_CHECKING:  # the api package imports pydantic; the core must not need it
    from finetune_api import FineTuneJobSpec, TrainingPlan


class NoFittingPlan(Exception):
    """No configuration the spec allows fits `spec.resources.gpu.memory`."""

    def __init__(self, decision: PlanDecision):
        super().__init__(decision.reason)
        self.decision = decision
        self.minimum_budget_bytes = decision.minimum_budget_bytes


def needs_gpu_nodes(spec: FineTuneJobSpec) -> bool:
    """Whether the cluster's GPU nodes can change this spec's plan: only `auto` with fp8
    allowed and no product named (a product decides FP8 by itself; a named method is
    planned as named)."""
    return (
        spec.method == "auto"
        and "fp8" in (spec.allowed_methods or METHODS)
        and not spec.resources.gpu.product
    )


def gpu_nodes_for_spec(
    spec: FineTuneJobSpec, nodes: Mapping[str, Mapping[str, str]] | None
) -> NodeFp8:
    """What `nodes` (name -> labels; None: unreadable) say about FP8 for this spec's budget
    and nodeSelector."""
    from finetune_api import parse_quantity

    resources = spec.resources
    return fp8_on_nodes(nodes, parse_quantity(resources.gpu.memory), resources.node_selector)


def request_from_spec(
    spec: FineTuneJobSpec, gpu_nodes: NodeFp8 | None = None
) -> tuple[PlanRequest, Budget]:
    from finetune_api import parse_quantity

    training, lora = spec.training, spec.lora
    micro = None if training.micro_batch_size == "auto" else int(training.micro_batch_size)
    ckpt = {"auto": None, "on": True, "off": False}[training.gradient_checkpointing]
    request = PlanRequest(
        method=spec.method,
        allowed_methods=tuple(spec.allowed_methods or METHODS),
        lora_r=lora.r,
        target_modules=tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        use_dora=lora.use_do_ra,
        seq_len=training.seq_length,
        packing=training.packing,
        batch_size=training.batch_size,
        micro_batch=micro,
        gradient_checkpointing=ckpt,
        optimizer=training.optimizer,
        double_quant=spec.quantization_or_default.double_quant,
        compile_layers=training.compile_layers != "off",
    )
    gpu = spec.resources.gpu
    return request, Budget(
        gpu_memory_bytes=parse_quantity(gpu.memory),
        gpu_count=gpu.count,
        nodes=gpu.nodes,
        gpu_product=gpu.product,
        gpu_nodes=gpu_nodes,
    )


def decide_for_spec(
    spec: FineTuneJobSpec,
    arch: ModelArch,
    constants: MemoryConstants = DEFAULT_CONSTANTS,
    gpu_nodes: NodeFp8 | None = None,
) -> PlanDecision:
    request, budget = request_from_spec(spec, gpu_nodes)
    return plan_training(arch, request, budget, constants)


def training_plan(decision: PlanDecision) -> TrainingPlan:
    """The API's `status.plan` for a decision that fits."""
    from finetune_api import MemoryBreakdown, TrainingPlan

    if decision.chosen is None:
        raise NoFittingPlan(decision)
    estimate = decision.chosen.estimate
    parts = estimate.breakdown
    breakdown = MemoryBreakdown(
        base_weights=parts["weights"],
        adapter_weights=parts["adapter_weights"],
        gradients=parts["gradients"],
        optimizer_state=parts["optimizer_state"],
        activations=parts["activations"] + parts["logits"] + parts["backward_buffers"],
        overhead=parts["workspace"] + parts["allocator_overhead"] + estimate.cuda_context,
    )
    return TrainingPlan(
        method=decision.chosen.shape.method,
        reason=decision.reason[:4096],
        # As nvidia-smi would show it (the breakdown's overhead includes the CUDA context),
        # the same terms as the budget it is compared with.
        estimated_peak_bytes=estimate.with_context,
        budget_bytes=decision.budget.gpu_memory_bytes,
        breakdown=breakdown,
        micro_batch_size=decision.chosen.shape.micro_batch,
        row_tokens=decision.chosen.shape.row_tokens,
        gradient_accumulation=decision.chosen.gradient_accumulation,
        gradient_checkpointing=decision.chosen.shape.gradient_checkpointing,
        checkpointed_layers=decision.chosen.shape.checkpointed_layers,
        fused_kernels=decision.request.fused_kernels,
        compiled_layers=decision.chosen.shape.compiled_layers,
        strategy=decision.chosen.strategy,
        nodes=decision.budget.nodes,
        processes_per_node=decision.budget.gpu_count,
        world_size=decision.budget.world_size,
        trainable_params=int(estimate.details["trainable_params"]),
        total_params=decision.arch.total_params(),
    )


def plan_for_spec(
    spec: FineTuneJobSpec,
    arch: ModelArch,
    constants: MemoryConstants = DEFAULT_CONSTANTS,
    gpu_nodes: NodeFp8 | None = None,
) -> TrainingPlan:
    """Plan a FineTuneJob: its `status.plan`, or NoFittingPlan with the minimum memory.
    `gpu_nodes`: what the cluster's GPU nodes say about FP8 (None: not looked at)."""
    return training_plan(decide_for_spec(spec, arch, constants, gpu_nodes))
