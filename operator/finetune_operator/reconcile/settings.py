"""Operator settings: command-line flags and environment, parsed once at start-up."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..constants import DEFAULT_SERVING_IMAGE, DEFAULT_WORKER_IMAGE


@dataclass
class OperatorSettings:
    worker_image: str = DEFAULT_WORKER_IMAGE
    """Default worker image (a FineTuneJob's spec.image overrides it)."""
    serving_image: str = DEFAULT_SERVING_IMAGE
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty means the whole cluster."""
    resync_seconds: float = 60.0
    """Every FineTuneJob is reconciled at least this often, events or not."""
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
    gpu_tolerations: list[dict] = field(default_factory=list)
    """Tolerations added to every worker pod on top of a job's own (GPU node pools are often
    tainted `nvidia.com/gpu:NoSchedule`)."""

    @classmethod
    def from_env(cls) -> OperatorSettings:
        s = cls()
        s.worker_image = os.environ.get("FINETUNE_WORKER_IMAGE", s.worker_image)
        s.serving_image = os.environ.get("FINETUNE_SERVING_IMAGE", s.serving_image)
        ns = os.environ.get("FINETUNE_NAMESPACES", "")
        s.namespaces = [n for n in ns.split(",") if n]
        s.resync_seconds = float(os.environ.get("FINETUNE_RESYNC_SECONDS", s.resync_seconds))
        s.pvc_root = os.environ.get("FINETUNE_PVC_ROOT") or None
        s.allow_hub = os.environ.get("FINETUNE_ALLOW_HUB", "true").lower() != "false"
        s.metrics_port = int(os.environ.get("FINETUNE_METRICS_PORT", s.metrics_port))
        s.reference_wait_seconds = float(os.environ.get("FINETUNE_REFERENCE_WAIT_SECONDS",
                                                        s.reference_wait_seconds))
        s.gpu_tolerations = json.loads(os.environ.get("FINETUNE_GPU_TOLERATIONS") or "[]")
        return s


SETTINGS = OperatorSettings.from_env()
