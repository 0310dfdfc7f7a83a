"""Operator settings: the operator's environment, parsed once when it starts.

Nothing is read at import: `main.py`'s start-up handler calls `OperatorSettings.from_env()`
and every reconcile gets the result as an argument, so importing any module of the
operator (tests, `finetune-operator plan`) has no effect from the environment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from finetune_api.constants import OPERATOR_NAME

from ..builders.server_group import ServingDefaults
from ..constants import DEFAULT_WORKER_IMAGE


@dataclass
class OperatorSettings:
    worker_image: str = DEFAULT_WORKER_IMAGE
    """Default worker image (a FineTuneJob's spec.image overrides it)."""
    serving: ServingDefaults = field(default_factory=ServingDefaults)
    """Defaults of the vLLM server pods (an AdapterDeployment's own fields win)."""
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty means the whole cluster."""
    resync_seconds: float = 60.0
    """Every FineTuneJob is reconciled at least this often, events or not."""
    resync_concurrency: int = 4
    """At most this many resync passes at once (the passes are spread over the interval;
    more run together only when they are slower than their places come)."""
    max_concurrent_passes: int = 16
    """Reconcile passes running at once, over all objects; the others wait their turn."""
    pvc_root: str | None = None
    """Local directory standing in for PVCs (dev and demo only): `pvc://claim/path` is read
    from `<pvc_root>/claim/path` when the planner needs a model's config.json."""
    allow_hub: bool = True
    """Fetch config.json from the Hugging Face Hub (HF_ENDPOINT) for models without a
    preset; off in air-gapped clusters, where spec.model.architecture is needed instead."""
    metrics_port: int = 8080
    reference_wait_seconds: float = 900.0
    """How long a FineTuneJob waits for a Secret or PVC it names (GitOps tools often sync
    them after the job) before it fails; counted from when it was first found missing."""
    gpu_nodes_cache_seconds: float = 60.0
    """How long a list of the GPU nodes' labels serves the planning of new jobs (gpunodes.py):
    a burst of jobs costs one list, and a node that joins is seen at most this much later."""
    gpu_tolerations: list[dict] = field(default_factory=list)
    """Tolerations added to every worker pod on top of a job's own (GPU node pools are often
    tainted `nvidia.com/gpu:NoSchedule`)."""
    peering: bool = False
    """An active/standby pair: kopf's peering is mandatory, not standalone."""
    peering_name: str = OPERATOR_NAME
    """The kopf peering object the pair shares."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """From FINETUNE_* variables (the chart sets them); ValueError names a bad one."""
        env = os.environ if environ is None else environ

        def parsed(name: str, parse, default):
            raw = env.get(name)
            if raw is None:
                return default
            try:
                return parse(raw)
            except ValueError as exc:
                raise ValueError(f"{name}={raw!r}: {exc}") from exc

        s = cls()
        s.worker_image = env.get("FINETUNE_WORKER_IMAGE", s.worker_image)
        # FINETUNE_SERVING_IMAGE is the chart's `serving.image`; an `image` in
        # FINETUNE_SERVING_DEFAULTS wins over it.
        s.serving = ServingDefaults.from_env(env, image=env.get("FINETUNE_SERVING_IMAGE"))
        ns = env.get("FINETUNE_NAMESPACES", "")
        s.namespaces = [n for n in ns.split(",") if n]
        s.resync_seconds = parsed("FINETUNE_RESYNC_SECONDS", float, s.resync_seconds)
        s.resync_concurrency = parsed("FINETUNE_RESYNC_CONCURRENCY", _positive_int, 4)
        s.max_concurrent_passes = parsed(
            "FINETUNE_MAX_CONCURRENT_PASSES", _positive_int, s.max_concurrent_passes
        )
        s.pvc_root = env.get("FINETUNE_PVC_ROOT") or None
        s.allow_hub = env.get("FINETUNE_ALLOW_HUB", "true").lower() != "false"
        s.metrics_port = parsed("FINETUNE_METRICS_PORT", int, s.metrics_port)
        s.reference_wait_seconds = parsed(
            "FINETUNE_REFERENCE_WAIT_SECONDS", float, s.reference_wait_seconds
        )
        s.gpu_nodes_cache_seconds = parsed(
            "FINETUNE_GPU_NODES_CACHE_SECONDS", _non_negative_float, s.gpu_nodes_cache_seconds
        )
        s.gpu_tolerations = parsed(
            "FINETUNE_GPU_TOLERATIONS", lambda v: json.loads(v or "[]"), s.gpu_tolerations
        )
        s.peering = env.get("FINETUNE_PEERING", "false").lower() == "true"
        s.peering_name = env.get("FINETUNE_PEERING_NAME", s.peering_name)
        return s


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be at least 0")
    return value
