"""Measured memory: peak GPU memory on CUDA, peak resident set size on a CPU run.

Reported as the run's truth next to the planner's prediction, so the two can be
compared job by job (and the planner recalibrated).
"""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

from finetune_api import format_bytes

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


def describe_plan(plan: TrainingPlan) -> str:
    return (
        f"method={plan.method}, micro-batch={plan.micro_batch_size}, "
        f"gradient accumulation={plan.gradient_accumulation}, "
        f"gradient checkpointing={'on' if plan.gradient_checkpointing else 'off'}, "
        f"predicted peak={format_bytes(plan.estimated_peak_bytes)}"
        + (f" of a {format_bytes(plan.budget_bytes)} budget" if plan.budget_bytes else "")
    )


def out_of_memory_message(plan: TrainingPlan, step: int | None, error: BaseException) -> str:
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
    return (
        f"CUDA out of memory {where}: {reached}; the plan was {describe_plan(plan)}. "
        "Set spec.training.microBatchSize lower, spec.training.gradientCheckpointing to "
        "'on', spec.method to 'qlora', or raise spec.resources.gpu.memory so the planner "
        f"leaves more headroom. ({first_line})"
    )
