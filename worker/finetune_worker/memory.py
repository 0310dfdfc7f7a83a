"""Measured memory: peak GPU memory on CUDA, peak resident set size on a CPU run; and the
plan's GPU memory budget as a cap on PyTorch's allocator.

Reported as the run's truth next to the planner's prediction, so the two can be
compared job by job (and the planner recalibrated).
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import TYPE_CHECKING

from finetune_api import format_bytes
from finetune_api.constants import CUDA_CONTEXT_BYTES

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from finetune_api import TrainingPlan


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_metrics(device_index: int | None = None) -> dict:
    """camelCase metrics: peak VRAM (reserved and allocated) or peak RSS, of this process.

    On `device_index` (a process of a distributed run, which owns one GPU), else the busiest
    GPU this process used.
    """
    import torch

    metrics: dict = {"peakRSSBytes": peak_rss_bytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = range(torch.cuda.device_count()) if device_index is None else [device_index]
        reserved = max(torch.cuda.max_memory_reserved(d) for d in devices)
        allocated = max(torch.cuda.max_memory_allocated(d) for d in devices)
        metrics.update(
            peakVRAMBytes=int(reserved),
            peakVRAM=format_bytes(reserved),
            peakVRAMAllocatedBytes=int(allocated),
            device="cuda",
        )
    else:
        metrics["device"] = "cpu"
    return metrics


def world_memory_metrics(per_rank: list[dict]) -> dict:
    """One run's memory from each rank's peak_memory_metrics (listed by global rank): the
    largest peak (the GPU that limits the plan) and, on GPUs, every rank's."""
    metrics = dict(per_rank[0])
    metrics["peakRSSBytes"] = max(m["peakRSSBytes"] for m in per_rank)
    metrics["worldSize"] = len(per_rank)
    if all("peakVRAMBytes" in m for m in per_rank):
        peaks = [m["peakVRAMBytes"] for m in per_rank]
        metrics.update(
            peakVRAMPerRankBytes=peaks,
            peakVRAMBytes=max(peaks),
            peakVRAM=format_bytes(max(peaks)),
            peakVRAMAllocatedBytes=max(m["peakVRAMAllocatedBytes"] for m in per_rank),
        )
    return metrics


def allocator_fraction(
    budget_bytes: int | None, context_bytes: int, device_total_bytes: int
) -> float | None:
    """The share of the device PyTorch's caching allocator may reserve, so that the process
    stays within its plan's per-GPU budget: the budget less the CUDA context (which counts
    against the budget but lies outside the allocator), as a fraction of the device's memory,
    in (0, 1]. None without a budget to keep to.

    A budget that leaves nothing after the context gives the smallest positive fraction (every
    allocation fails: the documented out-of-memory exit), never an uncapped process."""
    if not budget_bytes or device_total_bytes <= 0:
        return None
    allowed = max(budget_bytes - context_bytes, 1)
    return min(allowed / device_total_bytes, 1.0)


def cap_gpu_memory(plan: TrainingPlan, device: str) -> int | None:
    """Cap PyTorch's caching allocator on `device` (this process's GPU) at the plan's budget.

    The budget is what the job asked for (spec.resources.gpu.memory), not the card: on a GPU
    shared by time-slicing, a process that outgrew its prediction would take its neighbours'
    memory and crash one of them. Capped, the allocation that would pass the budget raises
    torch.OutOfMemoryError in this process, which the worker reports as its documented CUDA
    out-of-memory exit. Call before anything is allocated. -> the cap in bytes, or None.
    """
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    fraction = allocator_fraction(plan.budget_bytes, CUDA_CONTEXT_BYTES, total)
    if fraction is None:
        log.info("the plan has no GPU memory budget: PyTorch's allocator is not capped")
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    cap = int(fraction * total)
    log.info(
        "GPU memory: PyTorch's allocator on %s is capped at %s, the plan's %s budget less %s "
        "for the CUDA context (the device has %s)",
        device,
        format_bytes(cap),
        format_bytes(plan.budget_bytes),
        format_bytes(CUDA_CONTEXT_BYTES),
        format_bytes(total),
    )
    return cap


def describe_plan(plan: TrainingPlan) -> str:
    return (
        f"method={plan.method}, micro-batch={plan.micro_batch_size}, "
        + (f"rows of up to {plan.row_tokens} tokens, " if plan.row_tokens else "")
        + f"gradient accumulation={plan.gradient_accumulation}, "
        f"gradient checkpointing={'on' if plan.gradient_checkpointing else 'off'}, "
        f"predicted peak={format_bytes(plan.estimated_peak_bytes)}"
        + (f" of a {format_bytes(plan.budget_bytes)} budget" if plan.budget_bytes else "")
    )


def out_of_memory_message(
    plan: TrainingPlan, step: int | None, error: BaseException, cap_bytes: int | None = None
) -> str:
    metrics = peak_memory_metrics()
    peak = metrics.get("peakVRAMBytes")
    allocated = metrics.get("peakVRAMAllocatedBytes")
    where = f"at step {step}" if step is not None else "before the first training step"
    reached = (
        f"peak reserved {format_bytes(peak)}, peak allocated {format_bytes(allocated)}"
        if peak is not None
        else "peak GPU memory unknown"
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    capped = (
        f", and PyTorch's allocator was capped at {format_bytes(cap_bytes)} per GPU (the "
        "budget less the CUDA context)"
        if cap_bytes
        else ""
    )
    return (
        f"CUDA out of memory {where}: {reached}; the plan was {describe_plan(plan)}{capped}. "
        "Set spec.training.microBatchSize lower, spec.training.gradientCheckpointing to "
        "'on', spec.method to 'qlora', or raise spec.resources.gpu.memory so the planner "
        f"leaves more headroom. ({first_line})"
    )
