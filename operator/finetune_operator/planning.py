"""Planning a FineTuneJob: the I/O the pure planner needs, then the planner.

The planner (finetune_operator.planner) finds the architecture from spec hints, built-in
presets, a config.json on a local directory standing in for PVCs (dev clusters and the
demo) or the Hugging Face Hub. What only the operator can do is read the job's token
Secret for a gated repository (passed along and never logged), and, for `method: auto` without
a GPU product, the GPU nodes' labels, which say whether fp8 may be considered (gpunodes.py).
"""

from __future__ import annotations

import asyncio
import base64

from finetune_api.constants import Reason
from finetune_api.finetunejob import FineTuneJob, TrainingPlan

from . import gpunodes, k8s
from .planner import MethodNotSupported, UnknownArchitecture
from .planner.api_adapter import (
    NoFittingPlan,
    gpu_nodes_for_spec,
    needs_gpu_nodes,
    plan_for_spec,
)
from .planner.arch import HubUnavailable
from .planner.configsource import arch_for_model
from .planner.gpus import NodeFp8
from .reconcile.settings import OperatorSettings


class PlanningFailed(Exception):
    """No plan for this spec. `transient`: the cause may pass (the Hub did not answer), so the
    job waits and the pass is run again (requeue.py reads the flag) instead of failing."""

    def __init__(self, reason: str, message: str, *, transient: bool = False):
        super().__init__(message)
        self.reason = reason
        self.transient = transient


async def _hf_token(ftj: FineTuneJob) -> str | None:
    ref = ftj.spec.hf_token_secret_ref
    if ref is None:
        return None
    secret = await k8s.get("v1", "Secret", ftj.metadata.namespace, ref.name)
    value = ((secret or {}).get("data") or {}).get(ref.key)
    return base64.b64decode(value).decode().strip() if value else None


async def _gpu_nodes(ftj: FineTuneJob, settings: OperatorSettings) -> NodeFp8 | None:
    """What the GPU nodes that could take the job say about FP8; None where they cannot
    change its plan (then they are not read)."""
    if not needs_gpu_nodes(ftj.spec):
        return None
    labels = await gpunodes.gpu_node_labels(settings.gpu_nodes_cache_seconds)
    return gpu_nodes_for_spec(ftj.spec, labels)


async def plan_job(ftj: FineTuneJob, settings: OperatorSettings) -> TrainingPlan:
    token = await _hf_token(ftj)
    try:
        arch = await asyncio.to_thread(
            arch_for_model,
            ftj.spec.model,
            claims_root=settings.pvc_root,
            allow_hub=settings.allow_hub,
            token=token,
        )
    except HubUnavailable as exc:
        raise PlanningFailed(
            Reason.HUB_UNAVAILABLE, f"{exc}; retrying with backoff", transient=True
        ) from exc
    except UnknownArchitecture as exc:
        raise PlanningFailed(Reason.MODEL_CONFIG_UNAVAILABLE, str(exc)) from exc
    gpu_nodes = await _gpu_nodes(ftj, settings)
    try:
        return plan_for_spec(ftj.spec, arch, gpu_nodes=gpu_nodes)
    except NoFittingPlan as exc:
        raise PlanningFailed(Reason.PLAN_DOES_NOT_FIT, str(exc)) from exc
    except MethodNotSupported as exc:
        raise PlanningFailed(Reason.METHOD_NOT_SUPPORTED, str(exc)) from exc
